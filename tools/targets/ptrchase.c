/* ptrchase: a multi-threaded target whose pointer-rich state checks itself all the time.
 *
 * A ring of heap nodes (each holds its own address, its neighbours and a checksum over
 * them) is rewritten at full speed by a mutator thread: unlink the oldest node, free it,
 * malloc a new one, link it at the tail, generation++ — pointers to half-linked nodes live
 * in its registers at any instant. Four threads each own a private heap list (its head in a
 * register or on their stack) and block in a different syscall: futex (condition variable),
 * nanosleep, epoll_wait (eventfd), read (pipe); each verifies its list and the ring after
 * every wake-up. A broken invariant anywhere increments `broken` and prints BROKEN.
 *
 * Restoring a snapshot must bring memory and every thread's registers back together: the
 * mutator then finishes the update it was in, the generation goes back to the snapshot's,
 * and `broken` stays 0.
 *
 * stdin commands (one reply line each):
 *   gen     -> "gen G broken B"
 *   check   -> "ok G" or "bad G" (the whole ring and the extra list verified under the lock)
 *   grow    -> "grown": 32 MiB more heap (64 KiB chunks from brk) + 4 fresh 1 MiB mmaps,
 *              all linked into the checked "extra" list
 *   shrink  -> "shrunk": frees and unmaps all of it, malloc_trim(0) (the heap shrinks)
 *   openfd  -> "opened FD": a new pipe (its read end's number), kept open
 * First line: "ready <address of generation> <address of broken>".
 */
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

struct node { struct node *next, *prev, *self; unsigned long value, check; };
struct priv { struct priv *next, *self; unsigned long value; };
struct chunk { struct chunk *next, *self; size_t len; int mapped; unsigned long check; };

static struct node ring = { &ring, &ring, &ring, 0, 0 };
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static volatile unsigned long generation, broken;
static unsigned long nodes, sum;
static struct chunk *extra;
static int pipefd[2], evfd, epfd;

static unsigned long mix(const struct node *n)
{
    return n->value * 0x9E3779B97F4A7C15UL ^ (unsigned long)n->next ^ ((unsigned long)n->prev << 1);
}
static void seal(struct node *n) { n->self = n; n->check = mix(n); }
static int node_ok(const struct node *n)
{
    return n->self == n && n->check == mix(n) && n->next->prev == n && n->prev->next == n;
}
static void fail(const char *who, const char *what)
{
    __atomic_add_fetch(&broken, 1, __ATOMIC_SEQ_CST);
    fprintf(stderr, "BROKEN %s: %s at generation %lu\n", who, what, generation);
}

static unsigned long chunk_sum(const struct chunk *c) { return (unsigned long)c->next ^ c->len * 31 ^ (unsigned long)c; }

/* The ring and the extra list; the caller holds the lock. */
static int verify(const char *who)
{
    unsigned long count = 0, s = 0;
    if (ring.next->prev != &ring || ring.prev->next != &ring) { fail(who, "sentinel"); return 0; }
    for (struct node *n = ring.next; n != &ring; n = n->next) {
        if (!node_ok(n)) { fail(who, "node"); return 0; }
        s += n->value;
        if (++count > nodes) { fail(who, "ring longer than its count"); return 0; }
    }
    if (count != nodes || s != sum) { fail(who, "count or sum"); return 0; }
    for (struct chunk *c = extra; c; c = c->next) {
        unsigned char *p = (unsigned char *)(c + 1);
        if (c->self != c || c->check != chunk_sum(c) || p[c->len - sizeof *c - 1] != (unsigned char)c->len) {
            fail(who, "extra chunk"); return 0;
        }
    }
    return 1;
}

static void ring_push(unsigned long v)
{
    struct node *n = malloc(sizeof *n), *tail = ring.prev;
    n->value = v; n->next = &ring; n->prev = tail;
    tail->next = n; ring.prev = n;
    seal(n);
    if (tail != &ring) seal(tail);
    nodes++; sum += v;
}

static void *mutator(void *arg)
{
    (void)arg;
    unsigned long x = 88172645463325252UL;
    for (;;) {
        pthread_mutex_lock(&lock);
        struct node *old = ring.next, *after = old->next;
        ring.next = after; after->prev = &ring;
        if (after != &ring) seal(after);
        nodes--; sum -= old->value;
        old->self = NULL;
        free(old);
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        ring_push(x & 0xffff);
        unsigned long g = ++generation;
        if ((g & 63) == 0) verify("mutator");
        if ((g & 4095) == 0) {
            pthread_cond_broadcast(&cond);
            uint64_t one = 1;
            if (write(evfd, &one, sizeof one) < 0 || write(pipefd[1], "x", 1) < 0) fail("mutator", "wake write");
        }
        pthread_mutex_unlock(&lock);
    }
    return NULL;
}

static struct priv *priv_make(int n, unsigned long seed)
{
    struct priv *head = NULL;
    for (int i = 0; i < n; i++) {
        struct priv *p = malloc(sizeof *p);
        p->next = head; p->self = p; p->value = seed + i;
        head = p;
    }
    return head;
}

/* Check the private list (16 entries, values consecutive), then rotate one entry. */
static struct priv *priv_step(const char *who, struct priv *head)
{
    int n = 0;
    for (struct priv *p = head; p; p = p->next, n++)
        if (p->self != p || (p->next && p->next->value + 1 != p->value)) { fail(who, "private list"); return head; }
    if (n != 16) { fail(who, "private list length"); return head; }
    struct priv *fresh = malloc(sizeof *fresh), *last = head;
    while (last->next->next) last = last->next;
    free(last->next);
    last->next = NULL;
    fresh->next = head; fresh->self = fresh; fresh->value = head->value + 1;
    return fresh;
}

static void *futexer(void *arg)
{
    (void)arg;
    struct priv *mine = priv_make(16, 1000);
    for (;;) {
        pthread_mutex_lock(&lock);
        pthread_cond_wait(&cond, &lock);
        verify("futex waiter");
        pthread_mutex_unlock(&lock);
        mine = priv_step("futex waiter", mine);
    }
    return NULL;
}

static void *sleeper(void *arg)
{
    (void)arg;
    struct priv *mine = priv_make(16, 2000);
    struct timespec ts = { 0, 2000000 };
    for (;;) {
        nanosleep(&ts, NULL);
        mine = priv_step("sleeper", mine);
    }
    return NULL;
}

static void *epoller(void *arg)
{
    (void)arg;
    struct priv *mine = priv_make(16, 3000);
    struct epoll_event ev;
    for (;;) {
        int n = epoll_wait(epfd, &ev, 1, -1);
        if (n == 1) {
            uint64_t v;
            if (read(evfd, &v, sizeof v) < 0) fail("epoller", "eventfd read");
        }
        mine = priv_step("epoller", mine);
    }
    return NULL;
}

static void *reader(void *arg)
{
    (void)arg;
    struct priv *mine = priv_make(16, 4000);
    char c;
    for (;;) {
        if (read(pipefd[0], &c, 1) != 1) fail("reader", "pipe read");
        mine = priv_step("reader", mine);
    }
    return NULL;
}

static void grow(void)
{
    for (int i = 0; i < 516; i++) {
        int mapped = i >= 512;
        size_t len = mapped ? 1 << 20 : 64 << 10;
        struct chunk *c = mapped ? mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                                 : malloc(len);
        memset(c + 1, (unsigned char)len, len - sizeof *c);
        c->len = len; c->mapped = mapped; c->self = c; c->next = extra;
        c->check = chunk_sum(c);
        extra = c;
    }
}

static void shrink(void)
{
    while (extra) {
        struct chunk *c = extra;
        extra = c->next;
        if (c->mapped) munmap(c, c->len); else free(c);
    }
    malloc_trim(0);
}

int main(void)
{
    mallopt(M_MMAP_THRESHOLD, 128 << 10);  /* fixed: 64 KiB chunks always come from the heap */
    if (pipe(pipefd)) return 1;
    evfd = eventfd(0, 0);
    epfd = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = evfd };
    epoll_ctl(epfd, EPOLL_CTL_ADD, evfd, &ev);
    for (int i = 0; i < 1000; i++) ring_push(i);
    pthread_t t;
    void *(*fns[])(void *) = { futexer, sleeper, epoller, reader, mutator };
    for (unsigned i = 0; i < sizeof fns / sizeof fns[0]; i++) pthread_create(&t, NULL, fns[i], NULL);
    printf("ready %lx %lx\n", (unsigned long)&generation, (unsigned long)&broken);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "gen", 3)) {
            printf("gen %lu broken %lu\n", generation, broken);
        } else if (!strncmp(line, "check", 5)) {
            pthread_mutex_lock(&lock);
            int ok = verify("check");
            printf("%s %lu\n", ok ? "ok" : "bad", generation);
            pthread_mutex_unlock(&lock);
        } else if (!strncmp(line, "grow", 4)) {
            pthread_mutex_lock(&lock);
            grow();
            pthread_mutex_unlock(&lock);
            puts("grown");
        } else if (!strncmp(line, "openfd", 6)) {
            int fds[2];
            if (pipe(fds)) return 1;
            printf("opened %d\n", fds[0]);
        } else if (!strncmp(line, "shrink", 6)) {
            pthread_mutex_lock(&lock);
            shrink();
            pthread_mutex_unlock(&lock);
            puts("shrunk");
        }
        fflush(stdout);
    }
    return 0;
}
