/*
 * churn: threads born and dying all the time (for the freeze's attach loop).
 *
 *   churn NTHREADS
 *
 * NTHREADS loops each create a short-lived thread that bumps a counter, then join it, as
 * fast as they can. Prints "ready addr=<counter address>"; the counter must keep growing.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

static atomic_ulong counter;

static void *child(void *arg) {
    (void)arg;
    atomic_fetch_add(&counter, 1);
    return NULL;
}

static void *spawner(void *arg) {
    (void)arg;
    for (;;) {
        pthread_t t;
        if (pthread_create(&t, NULL, child, NULL) == 0) pthread_join(t, NULL);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 4;
    pthread_t t;
    for (int i = 0; i < n; i++) pthread_create(&t, NULL, spawner, NULL);
    printf("ready addr=%p\n", (void *)&counter);
    fflush(stdout);
    char line[16];
    while (fgets(line, sizeof line, stdin))
        if (line[0] == 'q') break;
    return 0;
}
