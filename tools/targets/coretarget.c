/*
 * coretarget: threads each blocked in a different named function, with known locals and
 * globals that keep changing, for the `core` view's gdb tests (and for timing the freeze's
 * per-thread recording: `coretarget N` adds N idle threads).
 *
 *   blocked_in_futex      FUTEX_WAIT on a word nobody wakes; local futex_local = 0x1111
 *   blocked_in_read       read() from a pipe nobody writes; local read_local = 0x2222
 *   blocked_in_nanosleep  nanosleep() for an hour; local sleep_local = 0x3333
 *   spin_forever          a busy loop: spin_local counts up and is copied into g_counter, so
 *                         at any instant g_counter == spin_local or spin_local - 1
 *   main_wait (main)      reads commands from stdin: "set N" sets g_phase = N (and
 *                         g_message), answers "ok N"
 *
 * Prints "ready pid=P counter=ADDR phase=ADDR" once every thread is (about to be) blocked.
 */
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

volatile uint64_t g_counter;
volatile int g_phase = 1;
char g_message[32] = "phase one";
struct point {
    int x, y;
} g_point = {12, 34};

static int futex_word;
static int pipe_fds[2];
static atomic_int started;

/* An empty asm with a memory clobber: the compiler cannot turn a call before it into a tail
 * call, nor drop the locals gdb is asked to print. */
#define KEEP(x) __asm__ volatile("" : : "g"(&(x)) : "memory")

__attribute__((noinline)) static void blocked_in_futex(void) {
    volatile int futex_local = 0x1111;
    atomic_fetch_add(&started, 1);
    for (;;) {
        syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        KEEP(futex_local);
    }
}

__attribute__((noinline)) static void blocked_in_read(void) {
    volatile long read_local = 0x2222;
    char buf[8];
    atomic_fetch_add(&started, 1);
    for (;;) {
        if (read(pipe_fds[0], buf, sizeof buf) <= 0)
            KEEP(read_local);
    }
}

__attribute__((noinline)) static void blocked_in_nanosleep(void) {
    volatile long sleep_local = 0x3333;
    atomic_fetch_add(&started, 1);
    for (;;) {
        struct timespec ts = {3600, 0};
        nanosleep(&ts, NULL);
        KEEP(sleep_local);
    }
}

__attribute__((noinline)) static void spin_forever(void) {
    volatile uint64_t spin_local = 0;
    atomic_fetch_add(&started, 1);
    for (;;) {
        spin_local = spin_local + 1;
        g_counter = spin_local;
    }
}

static void *idle_thread(void *arg) {
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

static void *run(void *fn) {
    ((void (*)(void))fn)();
    return NULL;
}

__attribute__((noinline)) static void main_wait(void) {
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        int n;
        if (sscanf(line, "set %d", &n) == 1) {
            g_phase = n;
            snprintf(g_message, sizeof g_message, "phase %d", n);
            g_point.x = n;
            printf("ok %d\n", n);
            fflush(stdout);
        }
    }
    exit(0);
}

int main(int argc, char **argv) {
    int idle = argc > 1 ? atoi(argv[1]) : 0;
    void (*fns[])(void) = {blocked_in_futex, blocked_in_read, blocked_in_nanosleep, spin_forever};
    if (pipe(pipe_fds))
        return 1;
    for (unsigned i = 0; i < sizeof fns / sizeof fns[0]; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, run, (void *)fns[i]))
            return 1;
    }
    for (int i = 0; i < idle; i++) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 64 << 10);
        if (pthread_create(&t, &attr, idle_thread, NULL))
            return 1;
    }
    while (atomic_load(&started) < 4)
        usleep(1000);
    usleep(20000); /* let them reach their blocking calls */
    printf("ready pid=%d counter=%p phase=%p\n", getpid(), (void *)&g_counter, (void *)&g_phase);
    fflush(stdout);
    main_wait();
    return 0;
}
