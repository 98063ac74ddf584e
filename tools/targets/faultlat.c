/*
 * faultlat: measures what a snapshot's write faults cost the target.
 *
 *   faultlat NPAGES WRITES GAP_US
 *
 * Populates NPAGES pages, prints "ready addr=... npages=N", waits for a line on stdin, then
 * writes one byte into WRITES distinct pages in a scattered order, GAP_US apart, timing each
 * write. Prints "lat n=... p50_us=... p90_us=... p99_us=... max_us=..." over the writes that
 * took longer than 2 us (a plain store to a writable page takes well under that), and
 * "slow=<count>", then waits for another line (or EOF) before exiting.
 * With FAULTLAT_TRACE=<file> in the environment it also writes one line per slow write,
 * "<page address> <start ns> <duration ns>" (CLOCK_MONOTONIC), to match with a fault
 * server's own timestamps.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 0) : 65536;
    size_t writes = argc > 2 ? strtoul(argv[2], NULL, 0) : 2000;
    unsigned gap = argc > 3 ? (unsigned)atoi(argv[3]) : 200;
    char *buf = mmap(NULL, n * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) return 1;
    madvise(buf, n * 4096, MADV_NOHUGEPAGE);
    for (size_t i = 0; i < n; i++) memset(buf + i * 4096, (int)(i * 7 + 1), 4096);
    printf("ready addr=%p npages=%zu\n", (void *)buf, n);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 0;
    double *lat = calloc(writes, sizeof *lat);
    double *start = calloc(writes, sizeof *start);
    size_t *page = calloc(writes, sizeof *page);
    size_t slow = 0;
    for (size_t i = 0; i < writes; i++) {
        size_t p = (i * 2654435761u) % n;
        double t0 = now_us();
        ((volatile char *)buf)[p * 4096 + 5] = 1;
        double dt = now_us() - t0;
        if (dt > 2.0) {
            start[slow] = t0;
            page[slow] = p;
            lat[slow++] = dt;
        }
        usleep(gap);
    }
    const char *trace = getenv("FAULTLAT_TRACE");
    FILE *tf = trace ? fopen(trace, "w") : NULL;
    for (size_t i = 0; tf && i < slow; i++)
        fprintf(tf, "%p %.0f %.0f\n", (void *)(buf + page[i] * 4096), start[i] * 1e3, lat[i] * 1e3);
    if (tf) fclose(tf);
    qsort(lat, slow, sizeof *lat, cmp);
    if (slow)
        printf("lat n=%zu p50_us=%.1f p90_us=%.1f p99_us=%.1f max_us=%.1f\n", slow, lat[slow / 2],
               lat[slow * 9 / 10], lat[slow * 99 / 100], lat[slow - 1]);
    printf("slow=%zu\n", slow);
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 0; /* stay alive until told */
    return 0;
}
