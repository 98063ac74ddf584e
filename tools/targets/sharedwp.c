/*
 * sharedwp: what userfaultfd write-protection does to memory shared by several processes,
 * each registered with a uffd of its own (the measurements behind process-tree snapshots,
 * docs/architecture.md "Process trees"; tests/test_kernel_sharedwp.py asserts them).
 *
 *   sharedwp anon|memfd|sysv [fork|closefork]
 *   sharedwp cost MIB NPROC TOUCH_PCT
 *
 * The monitor maps a shared region R (MAP_SHARED|MAP_ANONYMOUS, a memfd, or SysV shm) and a
 * private page, forks workers A and B (each creates a userfaultfd and hands it over, as
 * snapfs takes one from each target), registers R through those fds and drives the workers
 * one access at a time. Each line printed is "CASE WHO": WHO is the uffd that reported a
 * write fault for the access ("A", "B", "child"), "none" if it completed without one, or
 * "blocked" if it neither completed nor faulted. A fault is served by unprotecting the page
 * through the uffd that reported it. With "fork", the uffds ask for UFFD_FEATURE_EVENT_FORK
 * and a child's uffd is kept and served; with "closefork" it is closed on arrival.
 *
 * "cost": the parent populates TOUCH_PCT% of a MAP_SHARED|MAP_ANONYMOUS region of MIB MiB
 * and forks NPROC workers (each maps nothing of it: fork does not copy shared PTEs), then
 * registers and write-protects the whole region through every worker's uffd (markers in every
 * empty PTE); prints the time of each step and the page tables (VmPTE) one worker holds.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define NP 64
static char *R, *Q; /* shared region, private page */
static int memfd = -1;
static uint64_t features;
static const char *fork_mode = "";

static int send_fd(int sock, int fd) {
    char c = 'u', cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {&c, 1};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    return (int)sendmsg(sock, &m, 0);
}

static int recv_fd(int sock) {
    char c, cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {&c, 1};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    if (recvmsg(sock, &m, 0) <= 0) return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof(int));
    return fd;
}

struct worker { pid_t pid; int cmd, ack, uffd; const char *name; };
static struct worker W[2];
static int child_uffd = -1;

static void worker_loop(int sock, int cmd, int ack) {
    int u = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (u < 0 || ioctl(u, UFFDIO_API, &api)) { perror("userfaultfd"); _exit(1); }
    send_fd(sock, u);
    close(u);
    char line[64];
    FILE *in = fdopen(cmd, "r");
    while (fgets(line, sizeof line, in)) {
        char op = line[0];
        int p = atoi(line + 2);
        pid_t c;
        switch (op) {
        case 'w': R[p * PAGE] = 'W'; break;
        case 'r': { volatile char x = R[p * PAGE]; (void)x; break; }
        case 'd': madvise(R + p * PAGE, PAGE, MADV_DONTNEED); break;
        case 'P': if (memfd >= 0 && pwrite(memfd, "P", 1, (off_t)p * PAGE) != 1) perror("pwrite"); break;
        case 'f': /* a child writes shared page p, then exits */
        case 'F': /* a child writes the private page, then exits */
            c = fork();
            if (c == 0) {
                if (op == 'f') R[p * PAGE] = 'C'; else Q[0] = 'C';
                _exit(0);
            }
            waitpid(c, NULL, 0);
            break;
        case 'q': _exit(0);
        }
        if (write(ack, "k", 1) != 1) _exit(1);
    }
    _exit(0);
}

static struct worker spawn(const char *name) {
    int sv[2], c[2], a[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, sv) || pipe(c) || pipe(a)) { perror("pipe"); exit(1); }
    pid_t pid = fork();
    if (pid == 0) { close(c[1]); close(a[0]); worker_loop(sv[1], c[0], a[1]); }
    close(c[0]);
    close(a[1]);
    return (struct worker){pid, c[1], a[0], recv_fd(sv[0]), name};
}

static int reg(int uffd, char *addr, size_t len) {
    struct uffdio_register r = {.range = {(uint64_t)addr, len}, .mode = UFFDIO_REGISTER_MODE_WP};
    return ioctl(uffd, UFFDIO_REGISTER, &r) ? errno : 0;
}

static int wp(int uffd, char *addr, size_t len, int on) {
    struct uffdio_writeprotect a = {.range = {(uint64_t)addr, len}, .mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
    return ioctl(uffd, UFFDIO_WRITEPROTECT, &a) ? errno : 0;
}

/* Have worker w do one access; print which uffd faulted for it. */
static void run(struct worker *w, char op, int p, const char *what) {
    char line[32];
    int n = snprintf(line, sizeof line, "%c %d\n", op, p);
    if (write(w->cmd, line, n) != n) exit(1);
    const char *who = "none";
    for (;;) {
        struct pollfd fds[4] = {{w->ack, POLLIN, 0}, {W[0].uffd, POLLIN, 0}, {W[1].uffd, POLLIN, 0},
                                {child_uffd, POLLIN, 0}};
        if (poll(fds, child_uffd >= 0 ? 4 : 3, 1000) == 0) { who = "blocked"; break; }
        if (fds[0].revents) { char k; if (read(w->ack, &k, 1) != 1) exit(1); break; }
        for (int i = 1; i < 4; i++) {
            if (!(fds[i].revents & POLLIN)) continue;
            struct uffd_msg m;
            while (read(fds[i].fd, &m, sizeof m) == sizeof m) {
                if (m.event == UFFD_EVENT_FORK) {
                    child_uffd = (int)m.arg.fork.ufd;
                    if (!strcmp(fork_mode, "closefork")) { close(child_uffd); child_uffd = -1; }
                } else if (m.event == UFFD_EVENT_PAGEFAULT) {
                    who = i == 3 ? "child" : W[i - 1].name;
                    wp(fds[i].fd, (char *)(m.arg.pagefault.address & ~(uint64_t)(PAGE - 1)), PAGE, 0);
                }
            }
        }
    }
    printf("%s %s\n", what, who);
    fflush(stdout);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static long vmpte(pid_t pid) {
    char path[64], line[256];
    long v = -1;
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmPTE:", 6)) v = atol(line + 6);
    if (f) fclose(f);
    return v;
}

static int cost(size_t len, int n, int pct) {
    features = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    R = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (R == MAP_FAILED || n < 1 || n > 64) return 1;
    for (size_t o = 0; o < len / 100 * pct; o += PAGE) R[o] = 1;
    struct worker w[64];
    for (int i = 0; i < n; i++) w[i] = spawn("w");
    long pte0 = vmpte(w[0].pid);
    double t0 = now();
    for (int i = 0; i < n; i++) reg(w[i].uffd, R, len);
    double t1 = now();
    for (int i = 0; i < n; i++) wp(w[i].uffd, R, len, 1);
    double t2 = now();
    for (int i = 0; i < n; i++) wp(w[i].uffd, R, len, 1);
    double t3 = now();
    for (int i = 0; i < n; i++) wp(w[i].uffd, R, len, 0);
    double t4 = now();
    long pte1 = vmpte(w[0].pid);
    for (int i = 0; i < n; i++) close(w[i].uffd);
    long pte2 = vmpte(w[0].pid);
    double gib = len / 1073741824.0;
    printf("%zu MiB shared, %d%% populated, %d processes: register %.2f ms, protect %.2f ms "
           "(%.2f ms per GiB per process), again %.2f ms, unprotect %.2f ms; one worker's page "
           "tables %ld kB -> %ld kB (%ld kB once its uffd is closed)\n",
           len >> 20, pct, n, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t1) * 1e3 / n / gib,
           (t3 - t2) * 1e3, (t4 - t3) * 1e3, pte0, pte1, pte2);
    for (int i = 0; i < n; i++) {
        if (write(w[i].cmd, "q 0\n", 4) != 4) return 1;
        waitpid(w[i].pid, NULL, 0);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 4 && !strcmp(argv[1], "cost"))
        return cost((size_t)atol(argv[2]) << 20, atoi(argv[3]), atoi(argv[4]));
    const char *kind = argc > 1 ? argv[1] : "anon";
    fork_mode = argc > 2 ? argv[2] : "";
    features = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM |
               (*fork_mode ? UFFD_FEATURE_EVENT_FORK : 0);
    if (!strcmp(kind, "memfd")) {
        memfd = memfd_create("sharedwp", 0);
        if (ftruncate(memfd, NP * PAGE)) { perror("ftruncate"); return 1; }
        R = mmap(NULL, NP * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    } else if (!strcmp(kind, "sysv")) {
        int id = shmget(IPC_PRIVATE, NP * PAGE, IPC_CREAT | 0600);
        R = shmat(id, NULL, 0);
        shmctl(id, IPC_RMID, NULL);
    } else {
        R = mmap(NULL, NP * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    }
    Q = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (R == MAP_FAILED || R == (void *)-1 || Q == MAP_FAILED) { perror("map"); return 1; }
    Q[0] = 'q';
    for (int p = 0; p < 8; p++) R[p * PAGE] = 'i'; /* pages 0..7 in the page cache; 8.. holes */
    W[0] = spawn("A");
    W[1] = spawn("B");
    struct worker *A = &W[0], *B = &W[1];
    /* Fault-around maps cached neighbours on a read: zap afterwards to choose what is mapped. */
    for (int p = 0; p < 8; p++) { run(A, 'r', p, "setup"); run(B, 'r', p, "setup"); }
    for (int p = 4; p < 8; p++) { run(A, 'd', p, "setup"); run(B, 'd', p, "setup"); }
    run(B, 'd', 2, "setup");
    run(B, 'd', 3, "setup");
    /* Now: pages 0-1 mapped in A and B, 2-3 mapped in A only, 4-7 cached but mapped by
     * nobody, 8.. not in the page cache. */
    int err = reg(A->uffd, R, NP * PAGE);
    printf("register %s\n", err ? strerror(err) : "ok");
    if (err) return 0;
    wp(A->uffd, R, NP * PAGE, 1);
    run(B, 'w', 0, "only_a_protected.b_writes");
    run(A, 'w', 0, "only_a_protected.a_writes");
    reg(B->uffd, R, NP * PAGE);
    wp(A->uffd, R, NP * PAGE, 1);
    wp(B->uffd, R, NP * PAGE, 1);
    run(B, 'w', 1, "both.b_writes_mapped_in_both");
    run(A, 'w', 1, "both.a_writes_after_b_unprotected");
    run(A, 'w', 1, "both.a_writes_again");
    run(B, 'w', 2, "both.b_writes_not_mapped_in_b");
    run(B, 'r', 4, "both.b_reads_cached_unmapped");
    run(B, 'w', 4, "both.b_writes_after_reading");
    run(A, 'w', 5, "both.a_writes_cached_unmapped");
    run(B, 'w', 20, "both.b_writes_hole");
    run(A, 'w', 20, "both.a_writes_page_b_created");
    run(A, 'd', 3, "setup");
    run(A, 'w', 3, "both.a_writes_after_dontneed");
    if (memfd >= 0) run(A, 'P', 6, "both.a_pwrites_memfd");
    reg(A->uffd, Q, PAGE);
    wp(A->uffd, Q, PAGE, 1);
    run(A, 'f', 7, "fork.child_writes_shared");
    run(A, 'F', 0, "fork.child_writes_private");
    if (child_uffd >= 0) {
        int e = wp(child_uffd, R, PAGE, 0);
        printf("fork.dead_child_uffd %s\n", e ? strerror(e) : "ok");
    }
    for (int i = 0; i < 2; i++) {
        if (write(W[i].cmd, "q 0\n", 4) != 4) return 1;
        waitpid(W[i].pid, NULL, 0);
    }
    return 0;
}
