/*
 * treecounter: a one-cut oracle across processes, for process-tree snapshots.
 *
 *   treecounter NWORKERS SHARED_PAGES PRIVATE_PAGES [FORK_EVERY]
 *
 * The parent maps one MAP_SHARED|MAP_ANONYMOUS region (a header page, then SHARED_PAGES
 * pages) and forks NWORKERS workers; each worker maps its own private region (a header page,
 * then PRIVATE_PAGES pages). The workers then take global steps v = 1, 2, ... in lockstep,
 * at full speed: step v is taken by worker v % NWORKERS, which
 *   1. fills shared page v % SHARED_PAGES with step v (with FORK_EVERY > 0, every
 *      FORK_EVERY-th step of a worker is written by a child it forks for that write alone,
 *      which then exits: processes are born and die all through a capture);
 *   2. fills its private page (v / NWORKERS) % PRIVATE_PAGES with step v;
 *   3. records v as its last step in its private header;
 *   4. publishes v as the global step in the shared header (the next worker's turn).
 * Filling a page with step v writes words 1..511 = splitmix64(v * 512 + i) ^ tag (tag 0 in
 * the shared region, (w + 1) << 56 in worker w's), then word 0 = v last.
 *
 * So the memory of every process is a pure function of one number, the last published step
 * M: shared page p holds the latest v <= M with v = p (mod SHARED_PAGES); worker w's page j
 * holds the latest of its steps v = u * NWORKERS + w <= M with u = j (mod PRIVATE_PAGES);
 * before the first step, pages hold the same formula for M = 0 (steps <= 0 are the initial
 * fill). Only step M + 1 may be part-way: its shared page, then its private page, may hold a
 * prefix of words (old word 0), or be complete. A snapshot of the whole tree is one instant
 * iff all of that holds for the M in its shared header (tests/support/tree_oracle.py checks it).
 *
 * stdout: "ready shared=0x... nworkers=N shared_pages=S private_pages=P pids=a,b,c" once every
 * worker has filled its memory; each worker also prints "worker W pid=X private=0x...".
 * stdin: "q" (or EOF) stops the workers and exits.
 */
#include <limits.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define MAX_WORKERS 64

struct shared_header {
    _Atomic int64_t seq;   /* last published step M */
    _Atomic uint32_t ftx;  /* low 32 bits of seq: what waiters sleep on */
    uint32_t nworkers, shared_pages, private_pages, fork_every;
    int32_t pids[MAX_WORKERS];
    _Atomic uint32_t ready;
};

struct private_header {
    uint64_t magic;        /* "treectr" */
    int64_t worker;
    _Atomic int64_t last;  /* this worker's last step */
};

static struct shared_header *H;
static char *S;            /* shared data pages */
static int64_t N, NS, NP;
static int64_t fork_every;

static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static void fill(char *page, int64_t v, uint64_t tag) {
    volatile uint64_t *w = (volatile uint64_t *)page;
    for (int i = 1; i < WORDS; i++) w[i] = splitmix64((uint64_t)v * WORDS + i) ^ tag;
    atomic_store_explicit((_Atomic uint64_t *)page, (uint64_t)v, memory_order_release);
}

static int64_t floordiv(int64_t a, int64_t b) { return a / b - (a % b != 0 && (a < 0) != (b < 0)); }
static int64_t mod(int64_t a, int64_t b) { return a - floordiv(a, b) * b; }

/* The latest x <= top with x = r (mod m). */
static int64_t latest(int64_t top, int64_t r, int64_t m) { return top - mod(top - r, m); }

static long futex(_Atomic uint32_t *addr, int op, uint32_t val) {
    return syscall(SYS_futex, addr, op, val, NULL, NULL, 0);
}

static void worker(int64_t w) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    size_t len = (size_t)(NP + 1) * PAGE;
    char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); _exit(1); }
    struct private_header *ph = (struct private_header *)mem;
    char *P = mem + PAGE;
    uint64_t tag = (uint64_t)(w + 1) << 56;
    int64_t top = floordiv(0 - w, N); /* this worker's latest u at M = 0 */
    for (int64_t j = 0; j < NP; j++) fill(P + j * PAGE, latest(top, j, NP) * N + w, tag);
    ph->magic = 0x72746365657274ULL;
    ph->worker = w;
    ph->last = top * N + w;
    printf("worker %lld pid=%d private=%p\n", (long long)w, getpid(), (void *)mem);
    fflush(stdout);
    atomic_fetch_add(&H->ready, 1);
    for (;;) {
        int64_t s = atomic_load_explicit(&H->seq, memory_order_acquire);
        if (mod(s + 1, N) != w) {
            for (int spin = 0; spin < 200 && atomic_load(&H->seq) == s; spin++) __builtin_ia32_pause();
            if (atomic_load(&H->seq) == s) futex(&H->ftx, FUTEX_WAIT, (uint32_t)s);
            continue;
        }
        int64_t v = s + 1;
        char *sp = S + mod(v, NS) * PAGE;
        if (fork_every > 0 && mod(floordiv(v, N), fork_every) == 0) {
            pid_t c = fork();
            if (c == 0) { fill(sp, v, 0); _exit(0); }
            if (c < 0) fill(sp, v, 0);
            else waitpid(c, NULL, 0);
        } else {
            fill(sp, v, 0);
        }
        fill(P + mod(floordiv(v, N), NP) * PAGE, v, tag);
        atomic_store_explicit(&ph->last, v, memory_order_release);
        atomic_store_explicit(&H->seq, v, memory_order_release);
        atomic_store(&H->ftx, (uint32_t)v);
        futex(&H->ftx, FUTEX_WAKE, INT_MAX);
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: treecounter NWORKERS SHARED_PAGES PRIVATE_PAGES [FORK_EVERY]\n");
        return 2;
    }
    N = atoll(argv[1]);
    NS = atoll(argv[2]);
    NP = atoll(argv[3]);
    fork_every = argc > 4 ? atoll(argv[4]) : 0;
    if (N < 1 || N > MAX_WORKERS || NS < 1 || NP < 1) {
        fprintf(stderr, "treecounter: bad sizes\n");
        return 2;
    }
    char *mem = mmap(NULL, (size_t)(NS + 1) * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 1; }
    H = (struct shared_header *)mem;
    S = mem + PAGE;
    for (int64_t p = 0; p < NS; p++) fill(S + p * PAGE, latest(0, p, NS), 0);
    H->nworkers = (uint32_t)N;
    H->shared_pages = (uint32_t)NS;
    H->private_pages = (uint32_t)NP;
    H->fork_every = (uint32_t)fork_every;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int64_t w = 0; w < N; w++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) worker(w);
        H->pids[w] = pid;
    }
    while (atomic_load(&H->ready) < N) usleep(1000);
    printf("ready shared=%p nworkers=%lld shared_pages=%lld private_pages=%lld pids=", (void *)mem,
           (long long)N, (long long)NS, (long long)NP);
    for (int64_t w = 0; w < N; w++) printf(w ? ",%d" : "%d", H->pids[w]);
    printf("\n");
    char line[16];
    while (fgets(line, sizeof line, stdin) && line[0] != 'q') {}
    for (int64_t w = 0; w < N; w++) kill(H->pids[w], SIGKILL);
    while (wait(NULL) > 0) {}
    return 0;
}
