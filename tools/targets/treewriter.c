/*
 * treewriter: a tree of processes writing private and shared memory, timing what they suffer
 * (the process-tree rows of the bench, tools/bench/tree.py).
 *
 *   treewriter NPROC SHARED_MIB PRIVATE_MIB RATE
 *
 * The parent maps SHARED_MIB of MAP_SHARED|MAP_ANONYMOUS memory and a stats page, fills the
 * shared memory, then forks NPROC workers; each maps and fills PRIVATE_MIB of private memory
 * and then writes 8 bytes at a time into a random page, of its private memory or of the shared
 * memory in turn, RATE writes per second (0: as fast as it can). Pages are filled half with
 * hex text (compressible), half with random bytes. Each worker keeps in its stats slot:
 *
 *   stall_ns  the longest time one loop iteration took beyond its pacing (a process stopped
 *             by ptrace, or blocked on a write-protect fault, shows up here), since the
 *             stats generation last changed;
 *   writes    writes done; fork_ns: how long its last fork() took (the fork peer: what a
 *             process pays to fork a child that snapshots it, as Redis's BGSAVE does).
 *
 * The stats page is read and driven from outside through /proc/PID/mem (the bench): writing a
 * new ``generation`` resets every stall_ns; writing a new ``fork_request`` makes every worker
 * fork a child that exits at once, timing the fork().
 *
 * stdout: "ready shared=0x... stats=0x... pids=a,b,c" once every worker has filled its memory.
 * The workers die with the parent (PR_SET_PDEATHSIG); SIGTERM or stdin EOF ends the parent.
 */
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MAX_PROC 64

struct slot {
    _Atomic int64_t pid, writes, stall_ns, fork_ns, generation_seen, forks_seen;
    int64_t pad[2];
};

struct stats {
    _Atomic int64_t generation, fork_request, ready;
    int64_t nproc;
    int64_t pad[4];
    struct slot slot[MAX_PROC];
};

static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static void fill(uint8_t *mem, size_t len, uint64_t seed) {
    for (size_t p = 0; p < len / PAGE; p++) {
        uint64_t *w = (uint64_t *)(mem + p * PAGE);
        uint64_t r = splitmix64(seed + p);
        if (r & 1) {
            for (size_t i = 0; i < PAGE / 8; i++) w[i] = splitmix64(r + i);
        } else {
            for (size_t i = 0; i < PAGE; i++) mem[p * PAGE + i] = "0123456789abcdef"[(r >> (i % 60)) & 15];
        }
    }
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void worker(struct stats *st, int w, uint8_t *shared, size_t shared_len, size_t private_len, double rate) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    uint8_t *priv = mmap(NULL, private_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (priv == MAP_FAILED) { perror("mmap"); _exit(1); }
    fill(priv, private_len, (uint64_t)(w + 1) << 40);
    struct slot *s = &st->slot[w];
    s->pid = getpid();
    atomic_fetch_add(&st->ready, 1);
    uint64_t rng = splitmix64((uint64_t)w + 17) | 1;
    int64_t period = rate > 0 ? (int64_t)(1e9 / rate) : 0;
    int64_t next = now_ns(), prev = next;
    for (uint64_t i = 0;; i++) {
        int64_t gen = atomic_load(&st->generation);
        if (gen != s->generation_seen) {
            s->stall_ns = 0;
            s->generation_seen = gen;
        }
        int64_t req = atomic_load(&st->fork_request);
        if (req != s->forks_seen) {
            int64_t t0 = now_ns();
            pid_t c = fork();
            int64_t t1 = now_ns();
            if (c == 0) _exit(0);
            if (c > 0) waitpid(c, NULL, 0);
            s->fork_ns = t1 - t0;
            s->forks_seen = req;
        }
        rng = splitmix64(rng);
        uint8_t *base = (i & 1) ? shared : priv;
        size_t len = (i & 1) ? shared_len : private_len;
        *(volatile uint64_t *)(base + (rng % (len / PAGE)) * PAGE) = rng;
        s->writes++;
        int64_t t = now_ns();
        /* A stall: from when this write could start (its pacing deadline, or the end of the
         * previous write if that was later) to its end; a stop during the pacing sleep
         * counts too. */
        int64_t late = t - (period && next > prev ? next : prev);
        if (late > s->stall_ns) s->stall_ns = late;
        prev = t;
        if (period) {
            next += period;
            if (next < t - 100000000) next = t; /* catch up at most 100 ms */
            int64_t now = now_ns();
            if (next > now) {
                struct timespec d = {0, next - now};
                nanosleep(&d, NULL);
            }
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: treewriter NPROC SHARED_MIB PRIVATE_MIB RATE\n");
        return 2;
    }
    int n = atoi(argv[1]);
    size_t shared_len = (size_t)atol(argv[2]) << 20, private_len = (size_t)atol(argv[3]) << 20;
    double rate = atof(argv[4]);
    if (n < 1 || n > MAX_PROC || shared_len < PAGE || private_len < PAGE) {
        fprintf(stderr, "treewriter: bad arguments\n");
        return 2;
    }
    struct stats *st = mmap(NULL, sizeof *st, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    uint8_t *shared = mmap(NULL, shared_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (st == MAP_FAILED || shared == MAP_FAILED) { perror("mmap"); return 1; }
    fill(shared, shared_len, 1);
    st->nproc = n;
    for (int w = 0; w < n; w++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) worker(st, w, shared, shared_len, private_len, rate);
    }
    while (atomic_load(&st->ready) < n) usleep(1000);
    printf("ready shared=%p stats=%p pids=", (void *)shared, (void *)st);
    for (int w = 0; w < n; w++) printf(w ? ",%lld" : "%lld", (long long)st->slot[w].pid);
    printf("\n");
    fflush(stdout);
    char buf[64];
    while (fgets(buf, sizeof buf, stdin)) {}
    for (int w = 0; w < n; w++) kill((pid_t)st->slot[w].pid, SIGKILL);
    while (wait(NULL) > 0) {}
    return 0;
}
