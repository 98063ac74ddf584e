/*
 * forker: a thread that forks all the time, beside a main thread waiting on stdin.
 *
 *   forker [INTERVAL_US]
 *
 * Every INTERVAL_US (default 2000) the forking thread creates a child that does not exec
 * (it inherits every fd, like a database's background-save child), sleeps 3 s and exits.
 * Prints "ready"; reaps children as they end; "q" on stdin exits.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static long interval_us = 2000;

static void *forks(void *arg) {
    (void)arg;
    for (;;) {
        pid_t child = fork();
        if (child == 0) {
            sleep(3);
            _exit(0);
        }
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
        usleep(interval_us);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) interval_us = atol(argv[1]);
    pthread_t t;
    pthread_create(&t, NULL, forks, NULL);
    printf("ready\n");
    fflush(stdout);
    char line[16];
    while (fgets(line, sizeof line, stdin))
        if (line[0] == 'q') break;
    return 0;
}
