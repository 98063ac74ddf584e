/*
 * reexec: a process that starts its own program again (execve) every millisecond, for ever.
 *
 *   reexec [GENERATION]
 *
 * Each generation sleeps 1 ms, then executes itself with GENERATION+1, so the PID stays and
 * the program (its address space) is new every time: /proc/PID/cmdline shows how far it got.
 * The first generation prints "ready"; a second thread runs beside the main one each time.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void *spin(void *arg) {
    (void)arg;
    volatile unsigned long x = 0;
    for (;;) x++;
    return NULL;
}

int main(int argc, char **argv) {
    long gen = argc > 1 ? atol(argv[1]) : 0;
    pthread_t t;
    pthread_create(&t, NULL, spin, NULL);
    if (gen == 0) {
        printf("ready\n");
        fflush(stdout);
    }
    struct timespec ms = {0, 1000000};
    nanosleep(&ms, NULL);
    char next[32];
    snprintf(next, sizeof next, "%ld", gen + 1);
    char *args[] = {argv[0], next, NULL};
    execv("/proc/self/exe", args);
    perror("execv");
    return 1;
}
