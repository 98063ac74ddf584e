/*
 * oracle: a point-in-time oracle for snapshot tests.
 *
 *   oracle NPAGES NTHREADS [anon|thp|memfd|hugetlb] [mixed|plain] [WRITES_PER_S]
 *
 * Maps NPAGES pages and keeps writing them from NTHREADS threads as fast as it can. Every
 * write is serialised by one mutex: write number v (v = 1, 2, ...) fills page v % NPAGES
 * with word 0 = v and words i>0 = splitmix64(v * 512 + i) (with "mixed", odd v write a
 * compressible page: words i>0 = v), word 0 last. Initially page p holds v = p, so at ANY
 * instant the memory is a pure function of the last completed write number M:
 *   page p holds v_p = M - ((M - p) mod NPAGES),
 * except that page (M+1) % NPAGES may be half-way through write M+1 (a prefix of its words
 * 1.. new). A snapshot is consistent with exactly one instant iff every page matches that
 * for M = max(word 0); tests recompute every byte with numpy.
 *
 * stdout: one line "ready addr=0x... npages=N page=4096" once everything is written.
 * stdin commands (one letter per line), each acknowledged with "ok <letter>":
 *   d: madvise(DONTNEED) pages [N/4, N/4+N/16)      u: munmap pages [N/2, N/2+N/16)
 *   r: mremap pages [3N/4, 3N/4+N/16) elsewhere     q: exit 0
 *   f: fork a child that overwrites its copy of the buffer, wait for it
 *   x: execute /bin/sleep 1000 (same PID, a new program; no reply)
 * After d/u/r the writers skip those pages.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint64_t *buf;
static uint64_t npages;
static int mixed;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t seq;
static uint64_t skip_lo[3], skip_hi[3];
static atomic_int nskip;

static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static void fill(uint64_t v) {
    uint64_t *w = buf + (v % npages) * WORDS;
    /* Words 1.. in order, word 0 last: a page being written at the freeze shows its old
     * word 0 and a prefix of new words (that is what memory held at that instant). */
    if (mixed && (v & 1)) {
        for (int i = 1; i < WORDS; i++) ((volatile uint64_t *)w)[i] = v;
    } else {
        for (int i = 1; i < WORDS; i++) ((volatile uint64_t *)w)[i] = splitmix64(v * WORDS + i);
    }
    atomic_store_explicit((_Atomic uint64_t *)w, v, memory_order_release);
}

static int skipped(uint64_t p) {
    int n = atomic_load(&nskip);
    for (int i = 0; i < n; i++)
        if (p >= skip_lo[i] && p < skip_hi[i]) return 1;
    return 0;
}

static long pace_ns; /* per thread, between writes; 0: as fast as possible */

static void *writer(void *arg) {
    (void)arg;
    struct timespec pace = {pace_ns / 1000000000L, pace_ns % 1000000000L};
    for (;;) {
        pthread_mutex_lock(&lock);
        uint64_t v = ++seq;
        if (!skipped(v % npages)) fill(v);
        pthread_mutex_unlock(&lock);
        if (pace_ns) nanosleep(&pace, NULL);
    }
    return NULL;
}

static void *map_buffer(const char *kind, size_t size) {
    void *p;
    if (!strcmp(kind, "thp")) {
        size_t huge = 2 << 20;
        char *raw = mmap(NULL, size + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (raw == MAP_FAILED) return MAP_FAILED;
        p = (void *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
        madvise(p, size, MADV_HUGEPAGE);
        return p;
    }
    if (!strcmp(kind, "memfd")) {
        int fd = memfd_create("oracle", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, size) < 0) return MAP_FAILED;
        return mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    if (!strcmp(kind, "hugetlb"))
        return mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
    return mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

static void add_skip(uint64_t lo, uint64_t hi) {
    pthread_mutex_lock(&lock);
    int n = atomic_load(&nskip);
    skip_lo[n] = lo;
    skip_hi[n] = hi;
    atomic_store(&nskip, n + 1);
    pthread_mutex_unlock(&lock);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: oracle NPAGES NTHREADS [anon|thp|memfd|hugetlb] [mixed]\n");
        return 2;
    }
    npages = strtoull(argv[1], NULL, 0);
    int nthreads = atoi(argv[2]);
    const char *kind = argc > 3 ? argv[3] : "anon";
    mixed = argc > 4 && !strcmp(argv[4], "mixed");
    double rate = argc > 5 ? atof(argv[5]) : 0; /* writes per second, all threads together */
    pace_ns = rate > 0 ? (long)(1e9 * nthreads / rate) : 0;
    buf = map_buffer(kind, npages * PAGE);
    if (buf == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (uint64_t v = 0; v < npages; v++) fill(v);
    seq = npages - 1;
    printf("ready addr=%p npages=%llu page=%d\n", (void *)buf, (unsigned long long)npages, PAGE);
    fflush(stdout);
    pthread_t t;
    for (int i = 0; i < nthreads; i++) pthread_create(&t, NULL, writer, NULL);
    char line[64];
    uint64_t q = npages / 16 ? npages / 16 : 1;
    while (fgets(line, sizeof line, stdin)) {
        char c = line[0];
        if (c == 'q') return 0;
        char *base = (char *)buf;
        if (c == 'd') {
            add_skip(npages / 4, npages / 4 + q);
            madvise(base + npages / 4 * PAGE, q * PAGE, MADV_DONTNEED);
        } else if (c == 'u') {
            add_skip(npages / 2, npages / 2 + q);
            munmap(base + npages / 2 * PAGE, q * PAGE);
        } else if (c == 'r') {
            add_skip(npages * 3 / 4, npages * 3 / 4 + q);
            void *to = mmap(NULL, q * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (mremap(base + npages * 3 / 4 * PAGE, q * PAGE, q * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, to) == MAP_FAILED)
                perror("mremap");
        } else if (c == 'f') {
            /* A child scribbles over its copy of the buffer and exits; the parent's memory
             * is untouched by it. */
            pid_t child = fork();
            if (child == 0) {
                memset(base, 0x5a, npages * PAGE);
                _exit(0);
            }
            waitpid(child, NULL, 0);
        } else if (c == 'x') {
            execl("/bin/sleep", "sleep", "1000", (char *)NULL);
            perror("execl");
        } else {
            continue;
        }
        printf("ok %c\n", c);
        fflush(stdout);
    }
    return 0;
}
