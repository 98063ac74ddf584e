/*
 * populate: pages populated before and after a snapshot's freeze.
 *
 * Maps NPAGES (default 4096) anonymous pages (no THP) and, before printing "ready":
 *   [0, N/4)     written: every byte of page p is (p % 251) + 1
 *   [N/4, N/2)   only read (mapped to the shared zero page)
 *   [N/2, N)     never touched
 * stdin commands, each acknowledged with "ok <letter>":
 *   p: write 0xEE over pages [0, N/8) and [N/2, 3N/4) (the latter populated only now)
 *   d: madvise(MADV_DONTNEED) pages [N/8, N/4) (they become holes)
 *   s: write 0xAA over every 8th page of [0, N/4) (scattered single pages)
 *   n: map N/8 more pages and write 0xBB over them ("ok n addr=0x...": a new mapping)
 *   q: exit 0
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define PAGE 4096

int main(int argc, char **argv) {
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 0) : 4096;
    unsigned char *buf = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) return 1;
    madvise(buf, n * PAGE, MADV_NOHUGEPAGE);
    for (size_t p = 0; p < n / 4; p++) memset(buf + p * PAGE, (int)(p % 251) + 1, PAGE);
    volatile unsigned char sink = 0;
    for (size_t p = n / 4; p < n / 2; p++) sink += buf[p * PAGE];
    printf("ready addr=%p npages=%zu\n", (void *)buf, n);
    fflush(stdout);
    char line[16];
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'q') return 0;
        if (line[0] == 'p') {
            memset(buf, 0xEE, n / 8 * PAGE);
            memset(buf + n / 2 * PAGE, 0xEE, n / 4 * PAGE);
            printf("ok p\n");
            fflush(stdout);
        }
        if (line[0] == 's') {
            for (size_t p = 0; p < n / 4; p += 8) memset(buf + p * PAGE, 0xAA, PAGE);
            printf("ok s\n");
            fflush(stdout);
        }
        if (line[0] == 'n') {
            unsigned char *more = mmap(NULL, n / 8 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (more == MAP_FAILED) return 1;
            madvise(more, n / 8 * PAGE, MADV_NOHUGEPAGE);
            memset(more, 0xBB, n / 8 * PAGE);
            printf("ok n addr=%p\n", (void *)more);
            fflush(stdout);
        }
        if (line[0] == 'd') {
            madvise(buf + n / 8 * PAGE, n / 8 * PAGE, MADV_DONTNEED);
            printf("ok d\n");
            fflush(stdout);
        }
    }
    return 0;
}
