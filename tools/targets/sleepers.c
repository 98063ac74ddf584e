/*
 * sleepers: a process of a given size with many idle threads (a JVM-like thread count).
 *
 *   sleepers SIZE_MIB NTHREADS
 *
 * Maps SIZE_MIB MiB and writes every page, starts NTHREADS threads that wait on a condition
 * variable that is never signalled (futex wait), prints "ready threads=N+1 addr=0x..." and
 * waits for stdin to close (or a "q" line).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t never = PTHREAD_COND_INITIALIZER;

static void *idle(void *arg) {
    (void)arg;
    pthread_mutex_lock(&lock);
    for (;;) pthread_cond_wait(&never, &lock);
    return NULL;
}

int main(int argc, char **argv) {
    size_t size = (argc > 1 ? strtoull(argv[1], NULL, 10) : 64) << 20;
    int n = argc > 2 ? atoi(argv[2]) : 0;
    char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return 100;
    for (size_t off = 0; off < size; off += 4096) mem[off] = (char)(off >> 12) | 1;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 << 10);
    for (int i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, idle, NULL)) return 101;
    }
    printf("ready threads=%d addr=%p\n", n + 1, (void *)mem);
    fflush(stdout);
    char line[16];
    while (fgets(line, sizeof line, stdin))
        if (line[0] == 'q') break;
    return 0;
}
