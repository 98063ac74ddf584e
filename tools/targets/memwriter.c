/*
 * memwriter: a memory-writing target process for snapfs tests and benchmarks.
 *
 * It maps SIZE bytes, makes every page resident with a content mix (zero pages, compressible
 * hex text, random bytes), prints a JSON "ready" line, then keeps writing pages from 1-8 writer
 * threads at a paced rate (or as fast as it can) and measures what it suffers itself:
 *
 *   stall      time from when a write could have started (its pacing deadline, or the end of
 *              the thread's previous write, whichever is later) to the end of that write.
 *              A thread stopped by ptrace or blocked on a write-protect fault shows up here.
 *   slow write a single 8-byte store that took longer than --slow-ns (default 2 us): in
 *              practice a page fault (a userfaultfd write-protect fault during a snapshot);
 *              its duration is the fault round trip seen by the target.
 *   throughput writes per second.
 *
 * Every write stores 8 bytes at offset 0 of a page and keeps the page in its content class
 * (zero pages get zeros, compressible pages get hex digits, random pages get random bytes),
 * so the content mix and the non-zero size stay constant however fast it writes.
 * In --access seq mode thread t owns the t-th slice of the pages and walks it in order, writing
 * its own write counter (1, 2, 3, ...) at page offset 0 and CLOCK_MONOTONIC ns at offset 8:
 * a consistent image of a slice shows exactly one cut (an oracle for point-in-time tests).
 *
 * Reports are JSON lines on stdout (or appended to --stats FILE), one per SIGUSR1, per
 * --interval, and at exit (SIGTERM/SIGINT or --duration). Each covers the window since the
 * previous report and, under "total", everything since the ready line.
 * SIGUSR2 toggles a quiesced state: writers stop writing (the "paused" line is printed once
 * they have all stopped, after --dump FILE has been written with the whole region); a second
 * SIGUSR2 resumes them ("resumed" line). Time spent quiesced is not counted as a stall.
 *
 * Build: tools.targets.build("memwriter").  Run with --help for the options.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MAX_THREADS 64
#define MAX_IDLE 1024
#define STALL_LOG 65536 /* long stalls kept for the report (a ring: hundreds of idle threads
                           * under load log thousands a second) */
#define STALL_REPORT 32 /* the longest ones of a window are reported */
#define HIST_SUB 16 /* sub-buckets per power of two: ~6% resolution */
#define HIST_BUCKETS (HIST_SUB + 40 * HIST_SUB)
#define BACKLOG_NS 100000000ULL /* a paced writer catches up at most 100 ms of missed writes */

enum klass { K_ZERO = 0, K_TEXT = 1, K_RANDOM = 2 };
enum access { A_UNIFORM, A_HOT, A_SEQ };

static struct config {
    uint64_t size;
    unsigned mix_zero, mix_text; /* percent; random = the rest */
    int thp;
    int memfd;
    int threads;
    double rate; /* total page writes/s; <0 = as fast as possible; 0 = none */
    enum access access;
    double hot_frac, hot_prob;
    uint64_t seed;
    const char *stats_path;
    const char *dump_path;
    const char *handoff_path;
    double duration, interval;
    uint64_t slow_ns;
    uint64_t stall_log_ns;   /* stalls at least this long are logged with their time */
    uint64_t mappings;       /* split the region into this many VMAs (0/1: one) */
    int idle_threads;        /* threads that wake every idle_period_ms and time their lateness */
    double idle_period_ms;
    double gc_rate;          /* GC cycles/s over the arenas (0: no GC thread) */
    int gc_arenas;
    uint64_t gc_arena_size;
    const char *fork_path;   /* SIGHUP: fork a child that writes the region here */
} cfg = {
    .size = 64UL << 20, .mix_zero = 30, .mix_text = 40, .threads = 1, .rate = 0,
    .access = A_UNIFORM, .hot_frac = 0.1, .hot_prob = 0.9, .seed = 1, .slow_ns = 2000,
    .stall_log_ns = 1000000, .idle_period_ms = 10, .gc_arenas = 16, .gc_arena_size = 16UL << 20,
    .fork_path = "/dev/null",
};

static void die(const char *msg, const char *arg) __attribute__((noreturn));
static void log_stall(uint64_t end, uint64_t stall, int who);
static uint8_t *region;
static uint64_t npages;
static int out_fd = 1;

/* Per-thread counters: written by the owning writer only, read by the reporter. Relaxed
 * atomics compile to plain loads/stores here; the window maxima are taken with exchange. */
struct wstats {
    _Atomic uint64_t writes;
    _Atomic uint64_t slow;
    _Atomic uint64_t max_stall_ns;   /* since the last report (exchanged to 0 by it) */
    _Atomic uint64_t max_write_ns;   /* since the last report */
    _Atomic uint64_t last_write_ns;  /* end of the latest write, for "stalled now" */
    _Atomic uint64_t hist[HIST_BUCKETS]; /* durations of slow writes, cumulative */
    _Atomic uint64_t stall_hist[HIST_BUCKETS]; /* stalls >= slow_ns, cumulative */
} __attribute__((aligned(64)));

static struct wstats wst[MAX_THREADS];
static pthread_t writers[MAX_THREADS];

/* Quiesce / stop control. */
static pthread_mutex_t ctl_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ctl_cv = PTHREAD_COND_INITIALIZER;
static _Atomic int quiesce; /* writers must park */
static _Atomic int stopping;
static int parked; /* writers currently parked (under ctl_mu) */

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Uniform integer in [0, n) without division. */
static inline uint64_t below(uint64_t r, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)r * n) >> 64);
}

static inline enum klass page_class(uint64_t p)
{
    unsigned v = (unsigned)(splitmix64(p ^ (cfg.seed << 40)) % 100);
    if (v < cfg.mix_zero)
        return K_ZERO;
    if (v < cfg.mix_zero + cfg.mix_text)
        return K_TEXT;
    return K_RANDOM;
}

static const char HEX[16] = "0123456789abcdef";

static inline uint64_t hex8(uint64_t r)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)(uint8_t)HEX[(r >> (4 * i)) & 15] << (8 * i);
    return v;
}

/* Compressible page: 64-byte lines of hex text; every odd line repeats the line before it
 * with its first byte changed. zstd level 1 reaches roughly 3-4x on it. */
static void fill_text(uint8_t *pg, uint64_t *rng)
{
    uint64_t *w = (uint64_t *)pg;
    for (unsigned line = 0; line < PAGE / 64; line++) {
        uint64_t *l = w + line * 8;
        if (line & 1) {
            memcpy(l, l - 8, 64);
            ((uint8_t *)l)[0] = (uint8_t)HEX[line & 15];
        } else {
            for (int i = 0; i < 8; i++)
                l[i] = hex8(xorshift(rng));
        }
    }
}

static void fill_random(uint8_t *pg, uint64_t *rng)
{
    uint64_t *w = (uint64_t *)pg;
    for (unsigned i = 0; i < PAGE / 8; i++)
        w[i] = xorshift(rng);
}

struct fill_job {
    uint64_t first, last;
    uint64_t counts[3];
};

static void *fill_thread(void *arg)
{
    struct fill_job *j = arg;
    uint64_t rng = splitmix64(cfg.seed ^ (j->first * 0x100000001B3ULL)) | 1;
    for (uint64_t p = j->first; p < j->last; p++) {
        uint8_t *pg = region + p * PAGE;
        enum klass k = page_class(p);
        j->counts[k]++;
        if (k == K_ZERO)
            *(volatile uint64_t *)pg = 0; /* make it resident, content stays zero */
        else if (k == K_TEXT)
            fill_text(pg, &rng);
        else
            fill_random(pg, &rng);
    }
    return NULL;
}

static inline unsigned hist_bucket(uint64_t v)
{
    if (v < HIST_SUB)
        return (unsigned)v;
    unsigned e = 63 - (unsigned)__builtin_clzll(v); /* >= 4 */
    unsigned b = HIST_SUB + (e - 4) * HIST_SUB + (unsigned)((v >> (e - 4)) & (HIST_SUB - 1));
    return b < HIST_BUCKETS ? b : HIST_BUCKETS - 1;
}

/* Midpoint of a bucket, in ns. */
static double hist_value(unsigned b)
{
    if (b < HIST_SUB)
        return b;
    unsigned e = (b - HIST_SUB) / HIST_SUB + 4;
    unsigned sub = (b - HIST_SUB) % HIST_SUB;
    double lo = ldexp(1.0, (int)e) + sub * ldexp(1.0, (int)e - 4);
    return lo + ldexp(1.0, (int)e - 5);
}

static inline void bump(_Atomic uint64_t *c, uint64_t by)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + by, memory_order_relaxed);
}

static inline void raise_max(_Atomic uint64_t *m, uint64_t v)
{
    if (v > atomic_load_explicit(m, memory_order_relaxed))
        atomic_store_explicit(m, v, memory_order_relaxed);
}

/* Park while quiesced; returns nonzero when the program is stopping. */
static int park_if_quiesced(void)
{
    if (!atomic_load_explicit(&quiesce, memory_order_relaxed))
        return atomic_load_explicit(&stopping, memory_order_relaxed);
    pthread_mutex_lock(&ctl_mu);
    parked++;
    pthread_cond_broadcast(&ctl_cv);
    while (atomic_load(&quiesce) && !atomic_load(&stopping))
        pthread_cond_wait(&ctl_cv, &ctl_mu);
    parked--;
    pthread_mutex_unlock(&ctl_mu);
    return atomic_load(&stopping);
}

static void *writer_thread(void *arg)
{
    int t = (int)(intptr_t)arg;
    struct wstats *st = &wst[t];
    uint64_t rng = splitmix64(cfg.seed * 7919 + (uint64_t)t + 1) | 1;
    uint64_t hot_n = (uint64_t)(cfg.hot_frac * (double)npages);
    if (hot_n == 0)
        hot_n = 1;
    uint64_t hot_threshold = (uint64_t)(cfg.hot_prob * 18446744073709551615.0);
    uint64_t slice_lo = npages * (uint64_t)t / (uint64_t)cfg.threads;
    uint64_t slice_hi = npages * (uint64_t)(t + 1) / (uint64_t)cfg.threads;
    uint64_t seq_pos = slice_lo, counter = 0;

    if (cfg.rate == 0) { /* no writes: just wait for the end */
        pthread_mutex_lock(&ctl_mu);
        while (!atomic_load(&stopping))
            pthread_cond_wait(&ctl_cv, &ctl_mu);
        pthread_mutex_unlock(&ctl_mu);
        return NULL;
    }
    double period = cfg.rate > 0 ? 1e9 * cfg.threads / cfg.rate : 0; /* ns between writes */
    uint64_t prev_end = now_ns();
    double deadline = (double)prev_end;
    atomic_store(&st->last_write_ns, prev_end);

    for (;;) {
        if (atomic_load_explicit(&quiesce, memory_order_relaxed) ||
            atomic_load_explicit(&stopping, memory_order_relaxed)) {
            if (park_if_quiesced())
                return NULL;
            prev_end = now_ns(); /* time spent quiesced is not a stall */
            deadline = (double)prev_end;
            atomic_store(&st->last_write_ns, prev_end);
        }
        uint64_t expected = prev_end;
        if (period > 0) {
            uint64_t dl = (uint64_t)deadline;
            uint64_t now = now_ns();
            if (dl > now) {
                struct timespec ts = {.tv_sec = (time_t)(dl / 1000000000ULL),
                                      .tv_nsec = (long)(dl % 1000000000ULL)};
                while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
                    ;
            }
            if (dl > expected)
                expected = dl;
            deadline += period;
        }
        uint64_t r = xorshift(&rng), t0, end;
        if (cfg.access == A_SEQ) {
            volatile uint64_t *pg = (volatile uint64_t *)(region + seq_pos * PAGE);
            if (++seq_pos == slice_hi)
                seq_pos = slice_lo;
            t0 = now_ns();
            pg[0] = ++counter; /* the oracle: one cut per slice in a consistent image */
            pg[1] = t0;
            end = now_ns();
        } else {
            uint64_t p = (cfg.access == A_HOT && xorshift(&rng) <= hot_threshold) ? below(r, hot_n)
                                                                                  : below(r, npages);
            enum klass k = page_class(p);
            uint64_t value = k == K_ZERO ? 0 : k == K_TEXT ? hex8(r) : r * 0x9E3779B97F4A7C15ULL;
            volatile uint64_t *pg = (volatile uint64_t *)(region + p * PAGE);
            t0 = now_ns();
            *pg = value;
            end = now_ns();
        }
        uint64_t write_ns = end - t0;
        uint64_t stall = end - expected;
        bump(&st->writes, 1);
        atomic_store_explicit(&st->last_write_ns, end, memory_order_relaxed);
        raise_max(&st->max_stall_ns, stall);
        log_stall(end, stall, t);
        raise_max(&st->max_write_ns, write_ns);
        if (write_ns >= cfg.slow_ns) {
            bump(&st->slow, 1);
            bump(&st->hist[hist_bucket(write_ns)], 1);
        }
        if (stall >= cfg.slow_ns)
            bump(&st->stall_hist[hist_bucket(stall)], 1);
        prev_end = end;
        if (period > 0 && deadline < (double)end - BACKLOG_NS)
            deadline = (double)end - BACKLOG_NS; /* drop backlog older than 100 ms */
    }
}


/* ---- long stalls, with their time (for attributing them to a snapshot's phases) ---- */

enum { WHO_IDLE = 1000, WHO_GC = 3000 }; /* writers are 0..threads-1, idle thread i is 1000+i */
static struct { _Atomic uint64_t end_ns, stall_ns; _Atomic int who; } stall_log[STALL_LOG];
static _Atomic uint64_t stall_log_n;
static _Atomic uint64_t idle_max_stall_ns, gc_max_stall_ns; /* since the last report */
static _Atomic uint64_t idle_wakeups, gc_cycles;

static void log_stall(uint64_t end, uint64_t stall, int who)
{
    if (stall < cfg.stall_log_ns)
        return;
    uint64_t i = atomic_fetch_add(&stall_log_n, 1) % STALL_LOG;
    atomic_store_explicit(&stall_log[i].end_ns, end, memory_order_relaxed);
    atomic_store_explicit(&stall_log[i].stall_ns, stall, memory_order_relaxed);
    atomic_store_explicit(&stall_log[i].who, who, memory_order_relaxed);
}

static void raise_max_shared(_Atomic uint64_t *m, uint64_t v)
{
    uint64_t cur = atomic_load_explicit(m, memory_order_relaxed);
    while (v > cur && !atomic_compare_exchange_weak(m, &cur, v))
        ;
}

/* Idle threads (a JVM has hundreds: compiler, GC workers, timers, pools): each wakes every
 * idle_period_ms, touches its stack, and counts how late it woke as a stall. */
static void *idle_thread(void *arg)
{
    int i = (int)(intptr_t)arg;
    uint64_t period = (uint64_t)(cfg.idle_period_ms * 1e6);
    uint64_t next = now_ns() + period * (uint64_t)i / (uint64_t)(cfg.idle_threads ? cfg.idle_threads : 1);
    char scratch[256];
    while (!atomic_load_explicit(&stopping, memory_order_relaxed)) {
        struct timespec ts = {.tv_sec = (time_t)(next / 1000000000ULL), .tv_nsec = (long)(next % 1000000000ULL)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
            ;
        uint64_t now = now_ns();
        *(volatile char *)&scratch[now & 255] = 1; /* touch the stack, as a woken thread does */
        uint64_t late = now > next ? now - next : 0;
        raise_max_shared(&idle_max_stall_ns, late);
        log_stall(now, late, WHO_IDLE + i);
        atomic_fetch_add_explicit(&idle_wakeups, 1, memory_order_relaxed);
        next += period;
        if (next < now)
            next = now + period; /* missed periods are one stall, not many */
    }
    return NULL;
}

/* A garbage collector's memory traffic: gc_rate times a second it takes the next arena of a
 * pool, drops it (MADV_DONTNEED: a uffd REMOVE event; every 4th cycle munmap + mmap: UNMAP),
 * and allocates into it again (first touches), then copies ("evacuates") 1/8 of it into the
 * previous arena (writes to populated memory). Each cycle's lateness plus its own duration
 * is a stall: a JVM's allocating threads wait for such a pause. */
static void *gc_thread(void *arg)
{
    (void)arg;
    int n = cfg.gc_arenas;
    uint64_t sz = cfg.gc_arena_size;
    uint8_t **arenas = calloc((size_t)n, sizeof *arenas);
    for (int i = 0; i < n; i++) {
        arenas[i] = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (arenas[i] == MAP_FAILED)
            die("gc arena mmap failed", strerror(errno));
        madvise(arenas[i], sz, MADV_NOHUGEPAGE);
        memset(arenas[i], 0x5a, sz);
    }
    uint64_t period = (uint64_t)(1e9 / cfg.gc_rate);
    uint64_t next = now_ns() + period, cycle = 0;
    while (!atomic_load_explicit(&stopping, memory_order_relaxed)) {
        struct timespec ts = {.tv_sec = (time_t)(next / 1000000000ULL), .tv_nsec = (long)(next % 1000000000ULL)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
            ;
        int i = (int)(cycle % (uint64_t)n), prev = (int)((cycle + (uint64_t)n - 1) % (uint64_t)n);
        if (cycle % 4 == 3) {
            munmap(arenas[i], sz);
            arenas[i] = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (arenas[i] == MAP_FAILED)
                die("gc arena mmap failed", strerror(errno));
            madvise(arenas[i], sz, MADV_NOHUGEPAGE);
        } else {
            madvise(arenas[i], sz, MADV_DONTNEED);
        }
        for (uint64_t off = 0; off < sz; off += PAGE) /* allocation: first touch of every page */
            arenas[i][off] = (uint8_t)cycle;
        memcpy(arenas[prev], arenas[i], sz / 8); /* evacuation into populated memory */
        uint64_t now = now_ns();
        uint64_t stall = now > next ? now - next : 0;
        raise_max_shared(&gc_max_stall_ns, stall);
        log_stall(now, stall, WHO_GC);
        atomic_fetch_add_explicit(&gc_cycles, 1, memory_order_relaxed);
        cycle++;
        next += period;
        if (next < now)
            next = now + period;
    }
    return NULL;
}

/* ---- reporting ---- */

struct snap {
    uint64_t writes[MAX_THREADS], slow[MAX_THREADS];
    uint64_t hist[HIST_BUCKETS], stall_hist[HIST_BUCKETS];
    uint64_t t_ns;
};

static struct snap prev_snap, start_snap;
static uint64_t total_max_stall, total_max_write;

static void take_snap(struct snap *s)
{
    memset(s, 0, sizeof(*s));
    for (int t = 0; t < cfg.threads; t++) {
        s->writes[t] = atomic_load(&wst[t].writes);
        s->slow[t] = atomic_load(&wst[t].slow);
        for (unsigned b = 0; b < HIST_BUCKETS; b++) {
            s->hist[b] += atomic_load_explicit(&wst[t].hist[b], memory_order_relaxed);
            s->stall_hist[b] += atomic_load_explicit(&wst[t].stall_hist[b], memory_order_relaxed);
        }
    }
    s->t_ns = now_ns();
}

/* Percentile (0-100) of the histogram difference a - b, in microseconds; -1 if empty. */
static double pct_us(const uint64_t *a, const uint64_t *b, double pct)
{
    uint64_t n = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++)
        n += a[i] - (b ? b[i] : 0);
    if (n == 0)
        return -1;
    uint64_t rank = (uint64_t)ceil(pct / 100.0 * (double)n), seen = 0;
    if (rank == 0)
        rank = 1;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += a[i] - (b ? b[i] : 0);
        if (seen >= rank)
            return hist_value(i) / 1000.0;
    }
    return -1;
}

static char outbuf[1 << 16];
static size_t outlen;

static void emit(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void emit(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(outbuf + outlen, sizeof(outbuf) - outlen, fmt, ap);
    va_end(ap);
    if (n > 0)
        outlen += (size_t)n < sizeof(outbuf) - outlen ? (size_t)n : sizeof(outbuf) - outlen - 1;
}

/* One JSON line, written with one write() so readers never see half a line. */
static void flush_line(void)
{
    emit("\n");
    size_t off = 0;
    while (off < outlen) {
        ssize_t w = write(out_fd, outbuf + off, outlen - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        off += (size_t)w;
    }
    outlen = 0;
}

static uint64_t stall_log_seen; /* stall_log_n at the previous report */

/* "stalls": the window's longest logged stalls, [end time s, ms, who], longest first. */
static void emit_stalls(void)
{
    uint64_t n = atomic_load(&stall_log_n), first = stall_log_seen;
    if (n - first > STALL_LOG)
        first = n - STALL_LOG;
    stall_log_seen = n;
    uint64_t best[STALL_REPORT];
    int nb = 0;
    for (uint64_t i = first; i < n; i++) { /* keep the STALL_REPORT longest, sorted */
        uint64_t v = atomic_load_explicit(&stall_log[i % STALL_LOG].stall_ns, memory_order_relaxed);
        int pos = nb;
        while (pos > 0 && atomic_load_explicit(&stall_log[best[pos - 1] % STALL_LOG].stall_ns,
                                               memory_order_relaxed) < v)
            pos--;
        if (pos >= STALL_REPORT)
            continue;
        if (nb < STALL_REPORT)
            nb++;
        memmove(&best[pos + 1], &best[pos], (size_t)(nb - 1 - pos) * sizeof best[0]);
        best[pos] = i;
    }
    emit("\"stalls\":[");
    for (int j = 0; j < nb; j++) {
        uint64_t i = best[j] % STALL_LOG;
        emit("%s[%.6f,%.3f,%d]", j ? "," : "", (double)atomic_load(&stall_log[i].end_ns) / 1e9,
             (double)atomic_load(&stall_log[i].stall_ns) / 1e6, atomic_load(&stall_log[i].who));
    }
    emit("],");
}

static void report(const char *reason)
{
    struct snap cur;
    take_snap(&cur);
    double window_s = (double)(cur.t_ns - prev_snap.t_ns) / 1e9;
    double total_s = (double)(cur.t_ns - start_snap.t_ns) / 1e9;
    uint64_t win_writes = 0, win_slow = 0, tot_writes = 0, tot_slow = 0;
    uint64_t win_max_stall = 0, win_max_write = 0, max_stalled_now = 0;
    uint64_t th_stall[MAX_THREADS], th_now[MAX_THREADS];
    int active = cfg.rate != 0 && !atomic_load(&quiesce);
    for (int t = 0; t < cfg.threads; t++) {
        win_writes += cur.writes[t] - prev_snap.writes[t];
        win_slow += cur.slow[t] - prev_snap.slow[t];
        tot_writes += cur.writes[t] - start_snap.writes[t];
        tot_slow += cur.slow[t] - start_snap.slow[t];
        th_stall[t] = atomic_exchange(&wst[t].max_stall_ns, 0);
        uint64_t mw = atomic_exchange(&wst[t].max_write_ns, 0);
        uint64_t last = atomic_load(&wst[t].last_write_ns);
        th_now[t] = active && cur.t_ns > last ? cur.t_ns - last : 0;
        if (th_now[t] > max_stalled_now)
            max_stalled_now = th_now[t];
        if (th_stall[t] > win_max_stall)
            win_max_stall = th_stall[t];
        if (mw > win_max_write)
            win_max_write = mw;
    }
    uint64_t writer_max_stall = win_max_stall;
    uint64_t idle_max = atomic_exchange(&idle_max_stall_ns, 0), gc_max = atomic_exchange(&gc_max_stall_ns, 0);
    if (idle_max > win_max_stall)
        win_max_stall = idle_max;
    if (gc_max > win_max_stall)
        win_max_stall = gc_max;
    if (win_max_stall > total_max_stall)
        total_max_stall = win_max_stall;
    if (win_max_write > total_max_write)
        total_max_write = win_max_write;

    emit("{\"event\":\"report\",\"reason\":\"%s\",\"pid\":%d,\"t\":%.6f,\"window_s\":%.6f,"
         "\"writes\":%" PRIu64 ",\"writes_per_s\":%.1f,\"max_stall_us\":%.1f,"
         "\"stalled_now_us\":%.1f,\"slow_writes\":%" PRIu64 ",\"slow_max_us\":%.1f,"
         "\"slow_p50_us\":%.1f,\"slow_p90_us\":%.1f,\"slow_p99_us\":%.1f,\"stall_p99_us\":%.1f,",
         reason, getpid(), (double)cur.t_ns / 1e9, window_s, win_writes,
         window_s > 0 ? (double)win_writes / window_s : 0.0, (double)win_max_stall / 1e3,
         (double)max_stalled_now / 1e3, win_slow,
         win_slow ? (double)win_max_write / 1e3 : -1.0,
         pct_us(cur.hist, prev_snap.hist, 50), pct_us(cur.hist, prev_snap.hist, 90),
         pct_us(cur.hist, prev_snap.hist, 99), pct_us(cur.stall_hist, prev_snap.stall_hist, 99));
    emit("\"writer_max_stall_us\":%.1f,\"idle_max_stall_us\":%.1f,\"gc_max_stall_us\":%.1f,"
         "\"idle_wakeups\":%" PRIu64 ",\"gc_cycles\":%" PRIu64 ",",
         (double)writer_max_stall / 1e3, (double)idle_max / 1e3, (double)gc_max / 1e3,
         atomic_load(&idle_wakeups), atomic_load(&gc_cycles));
    emit_stalls();
    emit("\"threads\":[");
    for (int t = 0; t < cfg.threads; t++)
        emit("%s{\"writes\":%" PRIu64 ",\"max_stall_us\":%.1f,\"stalled_now_us\":%.1f,"
             "\"slow_writes\":%" PRIu64 "}",
             t ? "," : "", cur.writes[t] - prev_snap.writes[t], (double)th_stall[t] / 1e3,
             (double)th_now[t] / 1e3, cur.slow[t] - prev_snap.slow[t]);
    emit("],\"total\":{\"seconds\":%.6f,\"writes\":%" PRIu64 ",\"writes_per_s\":%.1f,"
         "\"max_stall_us\":%.1f,\"slow_writes\":%" PRIu64 ",\"slow_max_us\":%.1f,"
         "\"slow_p50_us\":%.1f,\"slow_p99_us\":%.1f}}",
         total_s, tot_writes, total_s > 0 ? (double)tot_writes / total_s : 0.0,
         (double)total_max_stall / 1e3, tot_slow, tot_slow ? (double)total_max_write / 1e3 : -1.0,
         pct_us(cur.hist, start_snap.hist, 50), pct_us(cur.hist, start_snap.hist, 99));
    flush_line();
    prev_snap = cur;
}

/* ---- quiesce (SIGUSR2) and dump ---- */

static int dump_region(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    uint64_t off = 0, len = npages * PAGE;
    while (off < len) {
        ssize_t w = write(fd, region + off, len - off > (1UL << 24) ? (1UL << 24) : len - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            close(fd);
            return -e;
        }
        off += (uint64_t)w;
    }
    if (fsync(fd) < 0 || close(fd) < 0)
        return -errno;
    return 0;
}

static void set_quiesced(int on)
{
    pthread_mutex_lock(&ctl_mu);
    atomic_store(&quiesce, on);
    pthread_cond_broadcast(&ctl_cv);
    /* writers at rate 0 never write, so they are already quiet */
    int need = cfg.rate != 0 ? cfg.threads : 0;
    while (on && parked < need)
        pthread_cond_wait(&ctl_cv, &ctl_mu);
    pthread_mutex_unlock(&ctl_mu);
    if (on) {
        int err = cfg.dump_path ? dump_region(cfg.dump_path) : 0;
        emit("{\"event\":\"paused\",\"pid\":%d,\"t\":%.6f", getpid(), (double)now_ns() / 1e9);
        if (cfg.dump_path)
            emit(",\"dump\":\"%s\",\"dump_error\":\"%s\"", cfg.dump_path, err ? strerror(-err) : "");
        emit("}");
    } else {
        emit("{\"event\":\"resumed\",\"pid\":%d,\"t\":%.6f}", getpid(), (double)now_ns() / 1e9);
    }
    flush_line();
}

/* ---- the fork peer (SIGHUP): how in-memory databases save (Redis BGSAVE) ----
 * The main thread forks; the child writes the whole region to cfg.fork_path and exits while
 * the writers go on (their copy-on-write faults are stalls like any other). The "forked"
 * line, once the child is reaped, gives fork()'s own duration and the child's. */

static pid_t save_child;
static uint64_t save_started, save_fork_ns;

static void fork_save(void)
{
    if (save_child > 0)
        return; /* one save at a time */
    uint64_t t0 = now_ns();
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(cfg.fork_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0)
            _exit(3);
        uint64_t off = 0, len = npages * PAGE;
        while (off < len) {
            ssize_t w = write(fd, region + off, len - off > (1UL << 20) ? (1UL << 20) : len - off);
            if (w < 0 && errno != EINTR)
                _exit(4);
            if (w > 0)
                off += (uint64_t)w;
        }
        _exit(close(fd) < 0 ? 5 : 0);
    }
    uint64_t t1 = now_ns();
    log_stall(t1, t1 - t0, WHO_GC + 1);
    if (pid < 0) {
        emit("{\"event\":\"forked\",\"pid\":%d,\"error\":\"%s\"}", getpid(), strerror(errno));
        flush_line();
        return;
    }
    save_child = pid;
    save_started = t0;
    save_fork_ns = t1 - t0;
}

static void reap_save(void)
{
    int status;
    if (save_child <= 0 || waitpid(save_child, &status, WNOHANG) != save_child)
        return;
    save_child = 0;
    emit("{\"event\":\"forked\",\"pid\":%d,\"fork_us\":%.1f,\"child_s\":%.6f,\"status\":%d}",
         getpid(), (double)save_fork_ns / 1e3, (double)(now_ns() - save_started) / 1e9,
         WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    flush_line();
}

/* ---- userfaultfd handoff (--uffd-handoff PATH) ----
 * For benchmarks of dirty-logging peers: each connection to the unix socket PATH receives a
 * fresh userfaultfd of this process (SCM_RIGHTS); this process keeps no copy, so the receiver
 * holds the only reference and its death releases any protection. The receiver does UFFDIO_API
 * itself, choosing its features (sync WP, WP_ASYNC). */

static void send_fd(int conn, int fd)
{
    char byte = 'u';
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof(u.buf)};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    if (sendmsg(conn, &msg, MSG_NOSIGNAL) < 0)
        perror("memwriter: sendmsg");
}

static void *handoff_thread(void *arg)
{
    int lsock = (int)(intptr_t)arg;
    for (;;) {
        int conn = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return NULL;
        }
        int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        if (uffd < 0) {
            char msg[128];
            int n = snprintf(msg, sizeof msg, "E%s", strerror(errno));
            if (write(conn, msg, (size_t)n) < 0)
                perror("memwriter: write");
        } else {
            send_fd(conn, uffd);
            close(uffd);
        }
        close(conn);
    }
}

static void start_handoff(const char *path)
{
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (s < 0 || strlen(path) >= sizeof(a.sun_path))
        die("cannot create --uffd-handoff socket", path);
    strcpy(a.sun_path, path);
    unlink(path);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 4) < 0)
        die("cannot bind --uffd-handoff socket", path);
    chmod(path, 0600);
    pthread_t th;
    pthread_create(&th, NULL, handoff_thread, (void *)(intptr_t)s);
    pthread_detach(th);
}

/* ---- options ---- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: memwriter [options]\n"
            "  -s, --size SIZE          resident bytes, suffix K/M/G (default 64M)\n"
            "  -m, --mix Z,C,R          percent zero, compressible, random pages (default 30,40,30)\n"
            "      --thp                madvise(MADV_HUGEPAGE) (default MADV_NOHUGEPAGE)\n"
            "      --memfd              back the region with a memfd (shmem), MAP_SHARED\n"
            "  -t, --threads N          writer threads, 1-64 (default 1)\n"
            "  -r, --rate R             total page writes/s: 0 = none (default), N, or max\n"
            "  -a, --access MODE        uniform (default) | hot[:FRACTION[:PROBABILITY]]\n"
            "                           (hot set: the first FRACTION of pages, default 0.1:0.9)\n"
            "                           | seq (per-thread slices, counter + timestamp per page)\n"
            "      --seed N             content and access seed (default 1)\n"
            "      --stats FILE         append JSON lines here instead of stdout\n"
            "      --dump FILE          on SIGUSR2 (quiesce), write the whole region to FILE\n"
            "      --uffd-handoff PATH  hand a new userfaultfd of this process to each connection\n"
            "                           on the unix socket PATH (SCM_RIGHTS)\n"
            "  -d, --duration SECONDS   exit after this long (default: until SIGTERM/SIGINT)\n"
            "  -i, --interval SECONDS   also report every SECONDS\n"
            "      --slow-ns NS         a write slower than this is a slow write (default 2000)\n"
            "      --stall-log-ns NS    stalls this long are reported with their time (default 1 ms)\n"
            "      --mappings N         split the region into N mappings (VMAs) of equal size\n"
            "      --idle-threads N     threads waking every --idle-period-ms (default 10), timing\n"
            "                           their lateness as stalls (a JVM has hundreds)\n"
            "      --gc-rate N          a GC thread: N cycles/s, each drops an arena of a pool\n"
            "                           (MADV_DONTNEED, every 4th munmap+mmap), re-allocates it and\n"
            "                           copies 1/8 of it into the previous one\n"
            "      --gc-arenas N        arenas in the pool (default 16)\n"
            "      --gc-arena-size SIZE (default 16M)\n"
            "      --fork-dump PATH     on SIGHUP fork a child that writes the region to PATH and exits\n"
            "                           (default /dev/null); a \"forked\" line times fork() and the child\n"
            "Signals: SIGUSR1 report, SIGUSR2 quiesce/resume writers, SIGHUP fork a saving child,\n"
            "SIGTERM/SIGINT final report + exit.\n");
}

static void die(const char *msg, const char *arg)
{
    fprintf(stderr, "memwriter: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
    exit(2);
}

static uint64_t parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    uint64_t mult = 1;
    switch (*end) {
    case 'k': case 'K': mult = 1UL << 10; end++; break;
    case 'm': case 'M': mult = 1UL << 20; end++; break;
    case 'g': case 'G': mult = 1UL << 30; end++; break;
    case 't': case 'T': mult = 1UL << 40; end++; break;
    }
    if (*end == 'i' || *end == 'B')
        end++;
    if (*end == 'B')
        end++;
    if (end == s || *end || v <= 0)
        die("bad size", s);
    uint64_t bytes = (uint64_t)(v * (double)mult);
    return (bytes + PAGE - 1) & ~(PAGE - 1);
}

static double parse_double(const char *s, const char *what)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || v < 0 || isnan(v))
        die(what, s);
    return v;
}

static void parse_args(int argc, char **argv)
{
    enum { O_THP = 256, O_MEMFD, O_SEED, O_STATS, O_DUMP, O_SLOW, O_HANDOFF, O_STALL_LOG, O_MAPPINGS,
           O_IDLE, O_IDLE_PERIOD, O_GC_RATE, O_GC_ARENAS, O_GC_ARENA_SIZE, O_FORK_DUMP };
    static const struct option opts[] = {
        {"size", required_argument, 0, 's'},      {"mix", required_argument, 0, 'm'},
        {"thp", no_argument, 0, O_THP},            {"memfd", no_argument, 0, O_MEMFD},
        {"threads", required_argument, 0, 't'},   {"rate", required_argument, 0, 'r'},
        {"access", required_argument, 0, 'a'},    {"seed", required_argument, 0, O_SEED},
        {"stats", required_argument, 0, O_STATS}, {"dump", required_argument, 0, O_DUMP},
        {"duration", required_argument, 0, 'd'},  {"interval", required_argument, 0, 'i'},
        {"slow-ns", required_argument, 0, O_SLOW}, {"help", no_argument, 0, 'h'},
        {"uffd-handoff", required_argument, 0, O_HANDOFF},
        {"stall-log-ns", required_argument, 0, O_STALL_LOG}, {"mappings", required_argument, 0, O_MAPPINGS},
        {"idle-threads", required_argument, 0, O_IDLE}, {"idle-period-ms", required_argument, 0, O_IDLE_PERIOD},
        {"gc-rate", required_argument, 0, O_GC_RATE}, {"gc-arenas", required_argument, 0, O_GC_ARENAS},
        {"gc-arena-size", required_argument, 0, O_GC_ARENA_SIZE}, {"fork-dump", required_argument, 0, O_FORK_DUMP},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "s:m:t:r:a:d:i:h", opts, NULL)) != -1) {
        switch (c) {
        case 's': cfg.size = parse_size(optarg); break;
        case 'm': {
            unsigned z, t, r;
            if (sscanf(optarg, "%u,%u,%u", &z, &t, &r) != 3 || z + t + r != 100)
                die("--mix needs three percentages adding up to 100", optarg);
            cfg.mix_zero = z;
            cfg.mix_text = t;
            break;
        }
        case O_THP: cfg.thp = 1; break;
        case O_MEMFD: cfg.memfd = 1; break;
        case 't':
            cfg.threads = atoi(optarg);
            if (cfg.threads < 1 || cfg.threads > MAX_THREADS)
                die("--threads must be 1-64", optarg);
            break;
        case 'r':
            cfg.rate = strcmp(optarg, "max") == 0 ? -1 : parse_double(optarg, "bad --rate");
            break;
        case 'a':
            if (strcmp(optarg, "uniform") == 0) {
                cfg.access = A_UNIFORM;
            } else if (strcmp(optarg, "seq") == 0) {
                cfg.access = A_SEQ;
            } else if (strncmp(optarg, "hot", 3) == 0) {
                cfg.access = A_HOT;
                double f = cfg.hot_frac, p = cfg.hot_prob;
                int n = optarg[3] ? sscanf(optarg + 3, ":%lf:%lf", &f, &p) : 0;
                if ((optarg[3] && n < 1) || f <= 0 || f > 1 || p < 0 || p > 1)
                    die("--access hot[:FRACTION[:PROBABILITY]] with 0 < FRACTION <= 1", optarg);
                cfg.hot_frac = f;
                cfg.hot_prob = p;
            } else {
                die("--access must be uniform, hot[:F[:P]] or seq", optarg);
            }
            break;
        case O_SEED: cfg.seed = strtoull(optarg, NULL, 0); break;
        case O_STATS: cfg.stats_path = optarg; break;
        case O_DUMP: cfg.dump_path = optarg; break;
        case O_HANDOFF: cfg.handoff_path = optarg; break;
        case 'd': cfg.duration = parse_double(optarg, "bad --duration"); break;
        case 'i': cfg.interval = parse_double(optarg, "bad --interval"); break;
        case O_SLOW: cfg.slow_ns = (uint64_t)parse_double(optarg, "bad --slow-ns"); break;
        case O_STALL_LOG: cfg.stall_log_ns = (uint64_t)parse_double(optarg, "bad --stall-log-ns"); break;
        case O_MAPPINGS: cfg.mappings = (uint64_t)parse_double(optarg, "bad --mappings"); break;
        case O_IDLE:
            cfg.idle_threads = atoi(optarg);
            if (cfg.idle_threads < 0 || cfg.idle_threads > MAX_IDLE)
                die("--idle-threads must be 0-1024", optarg);
            break;
        case O_IDLE_PERIOD: cfg.idle_period_ms = parse_double(optarg, "bad --idle-period-ms"); break;
        case O_GC_RATE: cfg.gc_rate = parse_double(optarg, "bad --gc-rate"); break;
        case O_GC_ARENAS:
            cfg.gc_arenas = atoi(optarg);
            if (cfg.gc_arenas < 2)
                die("--gc-arenas must be at least 2", optarg);
            break;
        case O_GC_ARENA_SIZE: cfg.gc_arena_size = parse_size(optarg); break;
        case O_FORK_DUMP: cfg.fork_path = optarg; break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (optind < argc)
        die("unexpected argument", argv[optind]);
}

static const char *access_name(void)
{
    return cfg.access == A_UNIFORM ? "uniform" : cfg.access == A_SEQ ? "seq" : "hot";
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    if (cfg.stats_path) {
        out_fd = open(cfg.stats_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (out_fd < 0)
            die("cannot open --stats file", cfg.stats_path);
    }
    /* Sleeps end on time: the default 50 us timer slack would look like stalls. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

    npages = cfg.size / PAGE;
    int flags = MAP_NORESERVE, fd = -1;
    if (cfg.memfd) {
        fd = memfd_create("memwriter", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t)cfg.size) < 0)
            die("memfd_create/ftruncate failed", strerror(errno));
        flags |= MAP_SHARED;
    } else {
        flags |= MAP_PRIVATE | MAP_ANONYMOUS;
    }
    region = mmap(NULL, cfg.size, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (region == MAP_FAILED)
        die("mmap failed", strerror(errno));
    if (!cfg.memfd)
        madvise(region, cfg.size, cfg.thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    if (cfg.mappings > 1) {
        /* Every other piece executable too: neighbours with different flags never merge, so
         * the region is cfg.mappings VMAs (vm.max_map_count must allow it). */
        if (cfg.mappings > npages)
            die("--mappings is more than the pages of --size", NULL);
        for (uint64_t j = 1; j < cfg.mappings; j += 2) {
            uint64_t lo = npages * j / cfg.mappings, hi = npages * (j + 1) / cfg.mappings;
            if (mprotect(region + lo * PAGE, (hi - lo) * PAGE, PROT_READ | PROT_WRITE | PROT_EXEC) < 0)
                die("mprotect for --mappings failed (vm.max_map_count?)", strerror(errno));
        }
    }

    /* Signals are taken synchronously by the main thread; block them before any thread. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGUSR1);
    sigaddset(&sigs, SIGUSR2);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    sigaddset(&sigs, SIGCHLD);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    uint64_t fill_start = now_ns();
    struct fill_job jobs[MAX_THREADS];
    pthread_t fillers[MAX_THREADS];
    uint64_t counts[3] = {0, 0, 0};
    for (int t = 0; t < cfg.threads; t++) {
        jobs[t] = (struct fill_job){.first = npages * (uint64_t)t / (uint64_t)cfg.threads,
                                    .last = npages * (uint64_t)(t + 1) / (uint64_t)cfg.threads};
        pthread_create(&fillers[t], NULL, fill_thread, &jobs[t]);
    }
    for (int t = 0; t < cfg.threads; t++) {
        pthread_join(fillers[t], NULL);
        for (int k = 0; k < 3; k++)
            counts[k] += jobs[t].counts[k];
    }
    double fill_s = (double)(now_ns() - fill_start) / 1e9;

    take_snap(&start_snap);
    prev_snap = start_snap;
    for (int t = 0; t < cfg.threads; t++)
        pthread_create(&writers[t], NULL, writer_thread, (void *)(intptr_t)t);

    static pthread_t idlers[MAX_IDLE], gc;
    for (int i = 0; i < cfg.idle_threads; i++)
        pthread_create(&idlers[i], NULL, idle_thread, (void *)(intptr_t)i);
    if (cfg.gc_rate > 0)
        pthread_create(&gc, NULL, gc_thread, NULL);
    if (cfg.handoff_path)
        start_handoff(cfg.handoff_path);
    emit("{\"event\":\"ready\",\"pid\":%d,\"base\":\"0x%lx\",\"size\":%" PRIu64
         ",\"pages\":%" PRIu64 ",\"zero_pages\":%" PRIu64 ",\"text_pages\":%" PRIu64
         ",\"random_pages\":%" PRIu64 ",\"nonzero_bytes\":%" PRIu64
         ",\"thp\":%s,\"memfd\":%s,\"threads\":%d,\"idle_threads\":%d,\"mappings\":%" PRIu64
         ",\"gc_rate\":%g,\"rate\":%.1f,\"access\":\"%s\","
         "\"hot_frac\":%g,\"hot_prob\":%g,\"seed\":%" PRIu64 ",\"fill_s\":%.3f}",
         getpid(), (unsigned long)region, cfg.size, npages, counts[K_ZERO], counts[K_TEXT],
         counts[K_RANDOM], (counts[K_TEXT] + counts[K_RANDOM]) * PAGE,
         cfg.thp ? "true" : "false", cfg.memfd ? "true" : "false", cfg.threads, cfg.idle_threads,
         cfg.mappings, cfg.gc_rate, cfg.rate,
         access_name(), cfg.hot_frac, cfg.hot_prob, cfg.seed, fill_s);
    flush_line();

    uint64_t start = now_ns();
    uint64_t end_at = cfg.duration > 0 ? start + (uint64_t)(cfg.duration * 1e9) : 0;
    uint64_t next_tick = cfg.interval > 0 ? start + (uint64_t)(cfg.interval * 1e9) : 0;
    const char *final_reason = "duration";
    for (;;) {
        uint64_t now = now_ns(), wake = 0;
        if (end_at && now >= end_at)
            break;
        if (next_tick && now >= next_tick) {
            report("interval");
            next_tick += (uint64_t)(cfg.interval * 1e9);
            continue;
        }
        if (end_at)
            wake = end_at;
        if (next_tick && (!wake || next_tick < wake))
            wake = next_tick;
        int sig;
        if (wake) {
            uint64_t d = wake - now;
            struct timespec ts = {.tv_sec = (time_t)(d / 1000000000ULL), .tv_nsec = (long)(d % 1000000000ULL)};
            sig = sigtimedwait(&sigs, NULL, &ts);
        } else {
            sig = sigwaitinfo(&sigs, NULL);
        }
        if (sig < 0)
            continue; /* timeout or EINTR: re-evaluate */
        if (sig == SIGUSR1) {
            report("usr1");
        } else if (sig == SIGUSR2) {
            set_quiesced(!atomic_load(&quiesce));
        } else if (sig == SIGHUP) {
            fork_save();
        } else if (sig == SIGCHLD) {
            reap_save();
        } else {
            final_reason = sig == SIGTERM ? "sigterm" : "sigint";
            break;
        }
    }
    pthread_mutex_lock(&ctl_mu);
    atomic_store(&stopping, 1);
    pthread_cond_broadcast(&ctl_cv);
    pthread_mutex_unlock(&ctl_mu);
    for (int t = 0; t < cfg.threads; t++)
        pthread_join(writers[t], NULL);
    for (int i = 0; i < cfg.idle_threads; i++)
        pthread_join(idlers[i], NULL);
    if (cfg.gc_rate > 0)
        pthread_join(gc, NULL);
    report(final_reason);
    return 0;
}
