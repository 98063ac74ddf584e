/*
 * blocker: threads blocked in read, poll, nanosleep, futex and epoll_wait, checking after
 * they return that their results are exactly what they would be had they never been stopped.
 *
 *   blocker MAINCALL      (MAINCALL: read|poll|nanosleep|futex|epoll — done by the main
 *                          thread, the one snapfs injects syscalls into; the others run in
 *                          their own threads)
 *
 * Prints "ready" once every call is (about to be) blocked. A control thread waits for a line
 * on stdin, then writes "hello" into the read/poll/epoll pipes and wakes the futex. Each call
 * prints "ok <name>" or "FAIL <name>: ..."; the exit status is the number of failures.
 * nanosleep sleeps SLEEP_MS and must return 0 after at least that long (not much more).
 * epoll_wait is retried on EINTR: the kernel returns EINTR after any stop (signal(7)).
 */
#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SLEEP_MS 1500

static int p_read[2], p_poll[2], p_epoll[2];
static atomic_int futex_word;
static atomic_int failures;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void report(const char *name, int ok, const char *why) {
    if (ok) {
        printf("ok %s\n", name);
    } else {
        printf("FAIL %s: %s\n", name, why);
        atomic_fetch_add(&failures, 1);
    }
    fflush(stdout);
}

static void do_read(void) {
    char buf[16] = {0};
    ssize_t n = read(p_read[0], buf, sizeof buf);
    char why[64];
    snprintf(why, sizeof why, "n=%zd errno=%d buf=%.5s", n, n < 0 ? errno : 0, buf);
    report("read", n == 5 && !memcmp(buf, "hello", 5), why);
}

static void do_poll(void) {
    struct pollfd pfd = {.fd = p_poll[0], .events = POLLIN};
    int r = poll(&pfd, 1, -1);
    char why[64];
    snprintf(why, sizeof why, "r=%d errno=%d revents=%x", r, r < 0 ? errno : 0, pfd.revents);
    report("poll", r == 1 && (pfd.revents & POLLIN), why);
}

static void do_nanosleep(void) {
    struct timespec req = {SLEEP_MS / 1000, (SLEEP_MS % 1000) * 1000000L}, rem = {0, 0};
    double t0 = now();
    int r = nanosleep(&req, &rem);
    double dt = now() - t0;
    char why[80];
    snprintf(why, sizeof why, "r=%d errno=%d slept=%.3f", r, r < 0 ? errno : 0, dt);
    report("nanosleep", r == 0 && dt >= SLEEP_MS / 1000.0 && dt < SLEEP_MS / 1000.0 + 1.0, why);
}

static void do_futex(void) {
    long r;
    do {
        r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    } while (r == -1 && errno == EAGAIN && atomic_load(&futex_word) == 0);
    char why[64];
    snprintf(why, sizeof why, "r=%ld errno=%d word=%d", r, r < 0 ? errno : 0, atomic_load(&futex_word));
    /* Woken (0) or the word already changed (EAGAIN); never EINTR or a kernel code. */
    report("futex", (r == 0 || errno == EAGAIN) && atomic_load(&futex_word) == 1, why);
}

static void do_epoll(void) {
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 7}, out;
    epoll_ctl(ep, EPOLL_CTL_ADD, p_epoll[0], &ev);
    /* The kernel itself fails epoll_wait with EINTR after any stop (ptrace or SIGSTOP, see
     * signal(7)); it is never restarted, so programs retry it. */
    int r;
    do {
        r = epoll_wait(ep, &out, 1, -1);
    } while (r < 0 && errno == EINTR);
    char why[64];
    snprintf(why, sizeof why, "r=%d errno=%d data=%u", r, r < 0 ? errno : 0, out.data.u32);
    report("epoll", r == 1 && out.data.u32 == 7, why);
}

struct call {
    const char *name;
    void (*fn)(void);
};
static const struct call calls[] = {
    {"read", do_read}, {"poll", do_poll}, {"nanosleep", do_nanosleep},
    {"futex", do_futex}, {"epoll", do_epoll},
};
#define NCALLS (int)(sizeof calls / sizeof calls[0])

static void *run_call(void *arg) {
    ((const struct call *)arg)->fn();
    return NULL;
}

static void *control(void *arg) {
    (void)arg;
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return NULL;
    if (write(p_read[1], "hello", 5) != 5 || write(p_poll[1], "hello", 5) != 5 ||
        write(p_epoll[1], "hello", 5) != 5)
        perror("write");
    atomic_store(&futex_word, 1);
    syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    return NULL;
}

int main(int argc, char **argv) {
    const char *main_call = argc > 1 ? argv[1] : "read";
    if (pipe(p_read) || pipe(p_poll) || pipe(p_epoll)) return 100;
    pthread_t threads[NCALLS], ctl;
    int mine = -1;
    for (int i = 0; i < NCALLS; i++) {
        if (!strcmp(calls[i].name, main_call)) {
            mine = i;
            continue;
        }
        pthread_create(&threads[i], NULL, run_call, (void *)&calls[i]);
    }
    if (mine < 0) {
        fprintf(stderr, "unknown call %s\n", main_call);
        return 100;
    }
    pthread_create(&ctl, NULL, control, NULL);
    usleep(100000); /* let the threads block */
    printf("ready main=%s\n", main_call);
    fflush(stdout);
    calls[mine].fn();
    for (int i = 0; i < NCALLS; i++)
        if (i != mine) pthread_join(threads[i], NULL);
    pthread_join(ctl, NULL);
    return atomic_load(&failures);
}
