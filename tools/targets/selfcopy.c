/*
 * selfcopy: a target that records its own memory at a known instant.
 *
 *   selfcopy COPYFILE
 *
 * Fills buffers in .data, .bss, the brk heap, an mmap'd area and its stack with random
 * bytes, writes each as (u64 addr, u64 len, bytes) records to COPYFILE, prints
 * "ready addr=<mmap area>", then blocks in read(stdin): its memory does not change until a
 * line arrives. After that it overwrites every buffer over and over until stdin closes or a
 * "q" line arrives. A snapshot frozen while it is blocked must equal COPYFILE byte for byte.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static char data_buf[3 * 4096 + 100] = {1};
static char bss_buf[20 * 4096];

static uint64_t rng = 88172645463325252ULL;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void fill(void *p, size_t n) {
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++) b[i] = (unsigned char)next();
}

static void record(FILE *f, void *p, size_t n) {
    uint64_t hdr[2] = {(uint64_t)(uintptr_t)p, n};
    fwrite(hdr, sizeof hdr, 1, f);
    fwrite(p, 1, n, f);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    char stack_buf[6 * 4096];
    char *heap[4];
    size_t heap_len = 50000;
    for (int i = 0; i < 4; i++) heap[i] = malloc(heap_len);
    size_t map_len = 2 << 20;
    char *map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    fill(data_buf, sizeof data_buf);
    fill(bss_buf, sizeof bss_buf);
    fill(stack_buf, sizeof stack_buf);
    for (int i = 0; i < 4; i++) fill(heap[i], heap_len);
    fill(map, map_len);
    FILE *f = fopen(argv[1], "wb");
    if (!f) return 1;
    record(f, data_buf, sizeof data_buf);
    record(f, bss_buf, sizeof bss_buf);
    record(f, stack_buf, sizeof stack_buf);
    for (int i = 0; i < 4; i++) record(f, heap[i], heap_len);
    record(f, map, map_len);
    fclose(f);
    printf("ready addr=%p\n", (void *)map);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 0;
    /* Scribble until told to stop; stdin is non-blocking from now on. */
    fcntl(0, F_SETFL, O_NONBLOCK);
    for (unsigned round = 0;; round++) {
        memset(data_buf, (int)round, sizeof data_buf);
        memset(bss_buf, (int)round, sizeof bss_buf);
        memset(stack_buf, (int)round, sizeof stack_buf);
        for (int i = 0; i < 4; i++) memset(heap[i], (int)round, heap_len);
        memset(map, (int)round, map_len);
        ssize_t n = read(0, line, sizeof line);
        if (n == 0 || (n > 0 && line[0] == 'q')) break;
    }
    return 0;
}
