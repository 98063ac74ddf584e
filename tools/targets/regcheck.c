/*
 * regcheck: a target that notices at once if being stopped, injected into or released
 * changed any of its threads' state.
 *
 *   regcheck spin NTHREADS    NTHREADS threads (the main one included) run an assembly loop
 *                             that keeps all 15 general registers, ymm0-14 and MXCSR at
 *                             values it checks on every iteration.
 *   regcheck block            the main thread blocks in read(), others in nanosleep (a call
 *                             the kernel restarts through its restart block), futex wait and
 *                             poll; each call runs with callee-saved registers and ymm0-7
 *                             loaded, and checks them, its arguments and its result after.
 *   regcheck sleep            the same, but the main thread is the one in nanosleep.
 *   regcheck nomain NTHREADS  spin mode, but the main thread then calls pthread_exit: the
 *                             process lives on with a zombie leader.
 *
 * Every thread also checks its own signal mask and sigaltstack. In spin mode the main
 * thread counts SIGRTMIN+1 (queued real-time signals: none may be lost).
 *
 * stdout: "ready" once every thread runs; any corruption prints "FAIL ..." and exits 2 at once.
 * stdin commands, one per line:
 *   c   check: spin threads must have progressed since the last check; blocked threads are
 *       woken, verify their call, and block again. Replies "ok c <rounds>".
 *   s   replies "ok s <signals counted>".
 *   q   exit 0.
 */
#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MXCSR_RZ 0x7f80 /* all exceptions masked, round toward zero (not the default) */

/* uint64_t spin_regs(uint64_t iters, const uint64_t init[15 + 60]): 0, or 1 + the index of
 * the first register found wrong (0-14 general, 15-29 ymm0-14, 30 MXCSR). init holds the
 * 15 general registers (rax rbx rcx rdx rsi rdi rbp r8-r15) then ymm0-14 (4 words each). */
#define SLOT(i) #i "*8(%rsp)"
#define CHK(reg, i, n) \
    "add $1, %" #reg "\n addq $1, " #i "*8(%rsp)\n cmp " #i "*8(%rsp), %" #reg "\n jne .Lf" #n "\n"
#define YCHK(i) \
    "vpxor 128+32*" #i "(%rsp), %ymm" #i ", %ymm15\n vptest %ymm15, %ymm15\n jnz .Lfy" #i "\n"
#define YLOAD(i) "vmovdqu 120+32*" #i "(%rsi), %ymm" #i "\n vmovdqu %ymm" #i ", 128+32*" #i "(%rsp)\n"
#define FAIL(lbl, code) ".L" #lbl ": movq $" #code ", 648(%rsp)\n jmp .Lout\n"
__asm__(
    ".text\n.globl spin_regs\n.type spin_regs,@function\nspin_regs:\n"
    "push %rbx\n push %rbp\n push %r12\n push %r13\n push %r14\n push %r15\n"
    "sub $664, %rsp\n"
    "mov %rdi, 120(%rsp)\n"
    "mov 0(%rsi), %rax\n mov %rax, 0(%rsp)\n mov 8(%rsi), %rax\n mov %rax, 8(%rsp)\n"
    "mov 16(%rsi), %rax\n mov %rax, 16(%rsp)\n mov 24(%rsi), %rax\n mov %rax, 24(%rsp)\n"
    "mov 32(%rsi), %rax\n mov %rax, 32(%rsp)\n mov 40(%rsi), %rax\n mov %rax, 40(%rsp)\n"
    "mov 48(%rsi), %rax\n mov %rax, 48(%rsp)\n mov 56(%rsi), %rax\n mov %rax, 56(%rsp)\n"
    "mov 64(%rsi), %rax\n mov %rax, 64(%rsp)\n mov 72(%rsi), %rax\n mov %rax, 72(%rsp)\n"
    "mov 80(%rsi), %rax\n mov %rax, 80(%rsp)\n mov 88(%rsi), %rax\n mov %rax, 88(%rsp)\n"
    "mov 96(%rsi), %rax\n mov %rax, 96(%rsp)\n mov 104(%rsi), %rax\n mov %rax, 104(%rsp)\n"
    "mov 112(%rsi), %rax\n mov %rax, 112(%rsp)\n"
    YLOAD(0) YLOAD(1) YLOAD(2) YLOAD(3) YLOAD(4) YLOAD(5) YLOAD(6) YLOAD(7)
    YLOAD(8) YLOAD(9) YLOAD(10) YLOAD(11) YLOAD(12) YLOAD(13) YLOAD(14)
    "stmxcsr 656(%rsp)\n movl $0x7f80, 644(%rsp)\n ldmxcsr 644(%rsp)\n"
    "mov 0(%rsp), %rax\n mov 8(%rsp), %rbx\n mov 16(%rsp), %rcx\n mov 24(%rsp), %rdx\n"
    "mov 32(%rsp), %rsi\n mov 40(%rsp), %rdi\n mov 48(%rsp), %rbp\n mov 56(%rsp), %r8\n"
    "mov 64(%rsp), %r9\n mov 72(%rsp), %r10\n mov 80(%rsp), %r11\n mov 88(%rsp), %r12\n"
    "mov 96(%rsp), %r13\n mov 104(%rsp), %r14\n mov 112(%rsp), %r15\n"
    ".Lloop:\n"
    CHK(rax, 0, 1) CHK(rbx, 1, 2) CHK(rcx, 2, 3) CHK(rdx, 3, 4) CHK(rsi, 4, 5) CHK(rdi, 5, 6)
    CHK(rbp, 6, 7) CHK(r8, 7, 8) CHK(r9, 8, 9) CHK(r10, 9, 10) CHK(r11, 10, 11)
    CHK(r12, 11, 12) CHK(r13, 12, 13) CHK(r14, 13, 14) CHK(r15, 14, 15)
    YCHK(0) YCHK(1) YCHK(2) YCHK(3) YCHK(4) YCHK(5) YCHK(6) YCHK(7)
    YCHK(8) YCHK(9) YCHK(10) YCHK(11) YCHK(12) YCHK(13) YCHK(14)
    "stmxcsr 644(%rsp)\n cmpl $0x7f80, 644(%rsp)\n jne .Lfm\n"
    "subq $1, 120(%rsp)\n jnz .Lloop\n"
    "movq $0, 648(%rsp)\n jmp .Lout\n"
    FAIL(f1, 1) FAIL(f2, 2) FAIL(f3, 3) FAIL(f4, 4) FAIL(f5, 5) FAIL(f6, 6) FAIL(f7, 7)
    FAIL(f8, 8) FAIL(f9, 9) FAIL(f10, 10) FAIL(f11, 11) FAIL(f12, 12) FAIL(f13, 13)
    FAIL(f14, 14) FAIL(f15, 15)
    FAIL(fy0, 16) FAIL(fy1, 17) FAIL(fy2, 18) FAIL(fy3, 19) FAIL(fy4, 20) FAIL(fy5, 21)
    FAIL(fy6, 22) FAIL(fy7, 23) FAIL(fy8, 24) FAIL(fy9, 25) FAIL(fy10, 26) FAIL(fy11, 27)
    FAIL(fy12, 28) FAIL(fy13, 29) FAIL(fy14, 30) FAIL(fm, 31)
    ".Lout:\n ldmxcsr 656(%rsp)\n mov 648(%rsp), %rax\n vzeroupper\n"
    "add $664, %rsp\n pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %rbp\n pop %rbx\n ret\n"
    ".size spin_regs, .-spin_regs\n");
uint64_t spin_regs(uint64_t iters, const uint64_t *init);

/* long sys_checked(long nr, long a1, long a2, long a3, const uint64_t init[6 + 32]):
 * the syscall's result, with rbx rbp r12-r15 = init[0..6) and ymm0-7 = init[6..38) around
 * it; afterwards every one of them, the three arguments and MXCSR must be unchanged, else
 * returns -100000 - index. (The kernel preserves all but rax, rcx, r11.) */
#define YL(i) "vmovdqu 48+32*" #i "(%r8), %ymm" #i "\n"
#define YC(i) "vpxor 48+32*" #i "(%r8), %ymm" #i ", %ymm15\n vptest %ymm15, %ymm15\n jnz .Lsy" #i "\n"
#define SFAIL(lbl, code) ".L" #lbl ": mov $" #code ", %rax\n jmp .Lsout\n"
__asm__(
    ".text\n.globl sys_checked\n.type sys_checked,@function\nsys_checked:\n"
    "push %rbx\n push %rbp\n push %r12\n push %r13\n push %r14\n push %r15\n"
    "sub $40, %rsp\n"
    "mov %rsi, 0(%rsp)\n mov %rdx, 8(%rsp)\n mov %rcx, 16(%rsp)\n"
    "stmxcsr 32(%rsp)\n movl $0x7f80, 24(%rsp)\n ldmxcsr 24(%rsp)\n"
    "mov %rdi, %rax\n mov %rsi, %rdi\n mov %rdx, %rsi\n mov %rcx, %rdx\n xor %r10d, %r10d\n"
    "mov 0(%r8), %rbx\n mov 8(%r8), %rbp\n mov 16(%r8), %r12\n mov 24(%r8), %r13\n"
    "mov 32(%r8), %r14\n mov 40(%r8), %r15\n"
    YL(0) YL(1) YL(2) YL(3) YL(4) YL(5) YL(6) YL(7)
    "syscall\n"
    "cmp 0(%r8), %rbx\n jne .Ls1\n cmp 8(%r8), %rbp\n jne .Ls2\n cmp 16(%r8), %r12\n jne .Ls3\n"
    "cmp 24(%r8), %r13\n jne .Ls4\n cmp 32(%r8), %r14\n jne .Ls5\n cmp 40(%r8), %r15\n jne .Ls6\n"
    "cmp 0(%rsp), %rdi\n jne .Ls7\n cmp 8(%rsp), %rsi\n jne .Ls8\n cmp 16(%rsp), %rdx\n jne .Ls9\n"
    "test %r10, %r10\n jnz .Ls10\n"
    YC(0) YC(1) YC(2) YC(3) YC(4) YC(5) YC(6) YC(7)
    "stmxcsr 24(%rsp)\n cmpl $0x7f80, 24(%rsp)\n jne .Ls11\n"
    "jmp .Lsout\n"
    SFAIL(s1, -100001) SFAIL(s2, -100002) SFAIL(s3, -100003) SFAIL(s4, -100004)
    SFAIL(s5, -100005) SFAIL(s6, -100006) SFAIL(s7, -100007) SFAIL(s8, -100008)
    SFAIL(s9, -100009) SFAIL(s10, -100010) SFAIL(s11, -100011)
    SFAIL(sy0, -100020) SFAIL(sy1, -100021) SFAIL(sy2, -100022) SFAIL(sy3, -100023)
    SFAIL(sy4, -100024) SFAIL(sy5, -100025) SFAIL(sy6, -100026) SFAIL(sy7, -100027)
    ".Lsout:\n ldmxcsr 32(%rsp)\n vzeroupper\n add $40, %rsp\n"
    "pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %rbp\n pop %rbx\n ret\n"
    ".size sys_checked, .-sys_checked\n");
long sys_checked(long nr, long a1, long a2, long a3, const uint64_t *init);

static atomic_int failed;
static atomic_ulong signals;

struct thread_state;
struct control {
    int blocked; /* block/sleep mode */
    int n;       /* spin threads */
    struct thread_state *st;
};
static void *control(void *arg);

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!atomic_exchange(&failed, 1)) {
        printf("FAIL %s\n", msg);
        fflush(stdout);
    }
    _exit(2);
}

static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Each thread's own signal mask and sigaltstack, checked after every loop or call. */
struct thread_state {
    int index;
    sigset_t mask;
    char *altstack;
    atomic_ulong progress;
};

static void setup_thread(struct thread_state *st) {
    sigemptyset(&st->mask);
    sigaddset(&st->mask, SIGUSR2);
    sigaddset(&st->mask, SIGRTMIN + 3 + st->index % 8);
    pthread_sigmask(SIG_SETMASK, &st->mask, NULL);
    st->altstack = malloc(1 << 16);
    stack_t ss = {.ss_sp = st->altstack, .ss_size = 1 << 16, .ss_flags = 0};
    if (sigaltstack(&ss, NULL)) fail("sigaltstack: %s", strerror(errno));
}

static void check_thread(struct thread_state *st, const char *where) {
    sigset_t cur;
    pthread_sigmask(SIG_BLOCK, NULL, &cur);
    for (int s = 1; s < 64; s++)
        if (sigismember(&cur, s) != sigismember(&st->mask, s))
            fail("thread %d (%s): signal mask changed (signal %d)", st->index, where, s);
    stack_t ss;
    sigaltstack(NULL, &ss);
    if (ss.ss_sp != st->altstack || ss.ss_size != 1 << 16 || (ss.ss_flags & SS_DISABLE))
        fail("thread %d (%s): sigaltstack changed", st->index, where);
}

/* ---------------------------------------------------------------- spin mode */
static void *spin_thread(void *arg) {
    struct thread_state *st = arg;
    setup_thread(st);
    uint64_t init[15 + 60];
    for (uint64_t round = 1;; round++) {
        for (int i = 0; i < 75; i++) init[i] = mix(round * 1000 + st->index * 100 + i);
        uint64_t bad = spin_regs(20000, init);
        if (bad) fail("thread %d: register %llu changed while it ran", st->index, (unsigned long long)bad - 1);
        check_thread(st, "spin");
        atomic_fetch_add(&st->progress, 1);
    }
    return NULL;
}

static void on_signal(int sig) {
    (void)sig;
    atomic_fetch_add(&signals, 1);
}

/* ---------------------------------------------------------------- block mode */
enum call { CALL_READ, CALL_NANOSLEEP, CALL_FUTEX, CALL_POLL };
static const char *call_names[] = {"read", "nanosleep", "futex", "poll"};
static int pipes[4][2];
static atomic_int futex_word;
static atomic_int woken; /* how many blocked threads finished their check this round */
#define SLEEP_NS 200000000L

static void check_regs(enum call call, long r) {
    if (r <= -100000) fail("%s: register %ld changed across the call", call_names[call], -r - 100001);
}

static void *block_thread(void *arg) {
    struct thread_state *st = arg;
    enum call call = (enum call)st->index;
    setup_thread(st);
    uint64_t init[6 + 32];
    for (uint64_t round = 1;; round++) {
        for (int i = 0; i < 38; i++) init[i] = mix(round * 7777 + st->index * 100 + i);
        long r;
        char buf[16] = {0};
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        switch (call) {
        case CALL_READ:
            r = sys_checked(SYS_read, pipes[st->index][0], (long)buf, sizeof buf, init);
            check_regs(call, r);
            if (r != 5 || memcmp(buf, "hello", 5)) fail("read returned %ld (%.5s)", r, buf);
            break;
        case CALL_NANOSLEEP: {
            struct timespec req = {0, SLEEP_NS};
            r = sys_checked(SYS_nanosleep, (long)&req, 0, 0, init);
            check_regs(call, r);
            clock_gettime(CLOCK_MONOTONIC, &t1);
            double dt = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
            if (r != 0 || dt < SLEEP_NS / 1e9) fail("nanosleep returned %ld after %.3f s", r, dt);
            break;
        }
        case CALL_FUTEX:
            do {
                r = sys_checked(SYS_futex, (long)&futex_word, FUTEX_WAIT_PRIVATE, 0, init);
                check_regs(call, r);
            } while (r == -EAGAIN && atomic_load(&futex_word) == 0);
            if ((r != 0 && r != -EAGAIN) || atomic_load(&futex_word) == 0)
                fail("futex wait returned %ld", r);
            atomic_store(&futex_word, 0);
            break;
        case CALL_POLL: {
            struct pollfd pfd = {.fd = pipes[st->index][0], .events = POLLIN};
            r = sys_checked(SYS_poll, (long)&pfd, 1, -1, init);
            check_regs(call, r);
            if (r != 1 || !(pfd.revents & POLLIN)) fail("poll returned %ld", r);
            if (read(pipes[st->index][0], buf, sizeof buf) != 5) fail("poll: read after");
            break;
        }
        }
        check_thread(st, call_names[call]);
        atomic_fetch_add(&st->progress, 1);
        if (call != CALL_NANOSLEEP) atomic_fetch_add(&woken, 1);
    }
    return NULL;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "spin";
    int n = argc > 2 ? atoi(argv[2]) : 1;
    static struct thread_state st[64];
    pthread_t t;
    int blocked = 0;
    int nomain = !strcmp(mode, "nomain");
    if (nomain) mode = "spin";
    if (!strcmp(mode, "spin")) {
        if (n < 1 || n > 64) return 100;
        struct sigaction sa = {.sa_handler = on_signal, .sa_flags = SA_RESTART | SA_ONSTACK};
        sigaction(SIGRTMIN + 1, &sa, NULL);
        for (int i = 1; i < n; i++) {
            st[i].index = i;
            pthread_create(&t, NULL, spin_thread, &st[i]);
        }
    } else if (!strcmp(mode, "block") || !strcmp(mode, "sleep")) {
        for (int i = 0; i < 4; i++)
            if (pipe(pipes[i])) return 100;
        n = 4;
        /* Thread i makes call i; in "sleep" mode the main thread takes nanosleep. */
        int main_call = !strcmp(mode, "sleep") ? CALL_NANOSLEEP : CALL_READ;
        for (int i = 0; i < 4; i++) {
            if (i == main_call) continue;
            st[i].index = i;
            pthread_create(&t, NULL, block_thread, &st[i]);
        }
        st[main_call].index = main_call;
        blocked = 3;
    } else {
        fprintf(stderr, "usage: regcheck spin N | block | sleep\n");
        return 100;
    }
    int main_index = !strcmp(mode, "sleep") ? CALL_NANOSLEEP : 0;
    st[main_index].index = main_index;

    /* Commands are read by a control thread; the main thread does its part. */
    static struct control ctl;
    ctl = (struct control){blocked, n, st};
    pthread_create(&t, NULL, control, &ctl);
    usleep(50000);
    printf("ready mode=%s threads=%d\n", mode, n + 1);
    fflush(stdout);
    if (nomain) {
        st[0].index = 0;
        pthread_create(&t, NULL, spin_thread, &st[0]);
        pthread_exit(NULL);
    }
    if (!strcmp(mode, "spin"))
        spin_thread(&st[0]);
    else
        block_thread(&st[main_index]);
    return 0;
}

static void *control(void *arg) {
    struct control *ctl = arg;
    unsigned long last[64] = {0};
    unsigned long rounds = 0;
    char line[32];
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'q') _exit(0);
        if (line[0] == 's') {
            printf("ok s %lu\n", atomic_load(&signals));
            fflush(stdout);
            continue;
        }
        if (line[0] != 'c') continue;
        if (ctl->blocked) {
            atomic_store(&woken, 0);
            for (int i = 0; i < 4; i++)
                if (i == CALL_READ || i == CALL_POLL)
                    if (write(pipes[i][1], "hello", 5) != 5) fail("write");
            atomic_store(&futex_word, 1);
            syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
            /* read, poll and futex report back; nanosleep wakes by itself. */
            for (int i = 0; i < 400 && atomic_load(&woken) < 3; i++) usleep(5000);
            if (atomic_load(&woken) < 3) fail("blocked threads did not all wake (%d of 3)", atomic_load(&woken));
        } else {
            /* Every spin thread must complete a loop (~1 ms of CPU) within 5 s: generous
             * for a loaded machine, still catching a thread left stopped. */
            for (int i = 0; i < ctl->n; i++) {
                unsigned long p = atomic_load(&ctl->st[i].progress);
                for (int w = 0; p == last[i] && w < 100; w++) {
                    usleep(50000);
                    p = atomic_load(&ctl->st[i].progress);
                }
                if (p == last[i]) fail("thread %d made no progress in 5 s", i);
                last[i] = p;
            }
        }
        printf("ok c %lu\n", ++rounds);
        fflush(stdout);
    }
    return NULL;
}
