/*
 * The fault path's common case in C, run in a thread of its own without the GIL
 * (compiled at install time into snapfs.capture._native, see _native_build.py; fastfault.py
 * runs it; faults.py handles everything this loop does not).
 *
 * A Python fault thread needs the GIL for every fault, and the scan and compression threads
 * hold it often: winning it back took 50 us (one switch interval) at the median and
 * milliseconds at the tail. This loop serves a batch of write faults on 4 KiB pages of
 * populated, non-huge extents: copy the page into a ring shared with Python, claim it in the
 * ledger (under the ledger's mutex), then unprotect it, which wakes the writer. Anything else
 * (events, huge pages, addresses outside the ledger, an unprotect refused with EAGAIN) is
 * forwarded as the raw uffd messages, on a pipe, to the Python fault thread, which handles it
 * exactly as before. A full ring (the store is behind) makes this loop wait for room rather
 * than forward (wait_when_full; a tree member's loop forwards: its uffd also brings faults
 * on shared objects that only the Python thread serves): the Python thread served those
 * faults at ~6x the CPU per fault, holding the GIL the store needs, at SCHED_FIFO (16
 * writers at 100k writes/s: 6.3 s of its CPU against 1.0 s here), which only slowed the
 * store everyone was waiting for. Faults read but not served when the loop is stopped are
 * woken by the uffd's close (or by the unprotect of their page), as forwarded ones are.
 *
 * Ring protocol (single producer: this loop; single consumer: Python): slot i % capacity
 * holds the page of record i; counters[0] = head (records published, release store after
 * the page is copied), counters[1] = tail (records Python has copied out of the ring),
 * counters[2] = faults served here, counters[3] = "armed": Python asks for an eventfd write
 * on the next published record, counters[4] = "waiting": this loop waits for room, and asks
 * for an eventfd write (space_fd) once Python has taken records.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "fastfault.h"
#include "kabi.h"
#include "ledger.h"

#define PAGE 4096UL
#define MSG_SIZE ((int)sizeof(struct uffd_msg))
#define MAX_MSGS 128 /* 4096 bytes: a forwarded batch is one atomic pipe write */
#define EVENT_PAGEFAULT 0x12
/* After serving faults, the next wait ends after this long even when nothing came. The woken
 * writer usually has a slightly negative EEVDF lag (it ran just before faulting), so when
 * this thread sleeps the kernel may pick a capture thread over it, and on this PREEMPT_NONE,
 * HZ=250 kernel nothing re-picks until that thread blocks or its slice ends (1-4 ms). The
 * short timer wakeup preempts whatever runs; the pick after it finds the writer eligible. */
#define KICK_NS 30000

struct ledger {
    const uint64_t *start, *end;
    const int64_t *base;
    const uint8_t *huge;
    int64_t n;
    uint8_t *state;
    snapfs_mutex *lock;
};

static int64_t find_extent(const struct ledger *l, uint64_t addr)
{
    int64_t lo = 0, hi = l->n; /* first extent with start > addr */
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (l->start[mid] <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo > 0 && addr < l->end[lo - 1])
        return lo - 1;
    return -1;
}

int snapfs_serve_page(int pid, int uffd, unsigned long wp_request, uint64_t addr, int64_t slot,
                      uint8_t *state, snapfs_mutex *lock, uint8_t *page)
{
    int flags = 0;
    if (slot >= 0 && __atomic_load_n(&state[slot], __ATOMIC_RELAXED) == 0) {
        struct iovec local = {page, PAGE}, remote = {(void *)addr, PAGE};
        ssize_t r = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (r < 0 && errno == ESRCH)
            return -ESRCH;
        /* A short read: unmapped meanwhile (the event saying so follows); not saved. */
        if (r == (ssize_t)PAGE && snapfs_claim_one(state, slot, lock))
            flags |= SNAPFS_SAVED;
    }
    struct uffdio_writeprotect arg = {{addr, PAGE}, 0};
    if (ioctl(uffd, wp_request, &arg) != 0) {
        if (errno == EAGAIN) /* a mapping change pending: retry once its event is read */
            flags |= SNAPFS_BUSY;
        else if (errno != ENOENT && errno != EINVAL && errno != ENOMEM && errno != ESRCH &&
                 errno != EFAULT) /* else unmapped meanwhile, or the target is gone */
            return -errno;
    }
    return flags;
}

#define STOPPED 1 /* write_all: the stop fd became readable first */

/* Write all of buf to the (non-blocking) fd, waiting for room; gives up once stop_fd is
 * readable (the reader may be gone). 0, STOPPED or -errno. */
static int write_all(int fd, int stop_fd, const void *buf, size_t len)
{
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                return -errno;
            struct pollfd fds[2] = {{.fd = fd, .events = POLLOUT}, {.fd = stop_fd, .events = POLLIN}};
            if (poll(fds, 2, -1) < 0 && errno != EINTR)
                return -errno;
            if (fds[1].revents)
                return STOPPED;
            continue;
        }
        buf = (const char *)buf + n;
        len -= (size_t)n;
    }
    return 0;
}

/* Wait until the ring has room for n more records (Python took some) or stop_fd is
 * readable: 0, STOPPED or -errno. *tail is updated. The trio side, which lets saved pages
 * gather for a while before taking them, is told at once (notify_fd): a writer waits now. */
static int wait_for_room(uint64_t head, uint64_t *tail, int n, uint64_t capacity, int space_fd,
                         int stop_fd, int notify_fd, uint64_t *counters)
{
    int told = 0;
    while (head - *tail + (uint64_t)n > capacity) {
        __atomic_store_n(&counters[4], 1, __ATOMIC_SEQ_CST);
        /* Re-read after arming: a take() between the first read and the arming is seen. */
        *tail = __atomic_load_n(&counters[1], __ATOMIC_SEQ_CST);
        if (head - *tail + (uint64_t)n <= capacity)
            break;
        if (!told) {
            uint64_t one = 1;
            (void)!write(notify_fd, &one, sizeof one); /* an eventfd: never blocks for long */
            told = 1;
        }
        struct pollfd fds[2] = {{.fd = space_fd, .events = POLLIN}, {.fd = stop_fd, .events = POLLIN}};
        if (poll(fds, 2, -1) < 0 && errno != EINTR)
            return -errno;
        if (fds[1].revents)
            return STOPPED;
        uint64_t v;
        if (fds[0].revents && read(space_fd, &v, sizeof v) < 0 && errno != EAGAIN)
            return -errno;
        *tail = __atomic_load_n(&counters[1], __ATOMIC_ACQUIRE);
    }
    return 0;
}

void snapfs_ring_taken(uint64_t *counters, uint64_t tail, int space_fd)
{
    /* Both sides sequentially consistent (store, then read the other's flag), as the loop
     * in wait_for_room: one of them sees the other's store, so no wake-up is lost. */
    __atomic_store_n(&counters[1], tail, __ATOMIC_SEQ_CST);
    if (__atomic_exchange_n(&counters[4], 0, __ATOMIC_SEQ_CST)) {
        uint64_t one = 1;
        (void)!write(space_fd, &one, sizeof one);
    }
}

/* Serve faults until stop_fd is readable. Returns 0, or -errno on a fatal error (-ESRCH:
 * the target is gone). */
int snapfs_fault_loop(int uffd, int stop_fd, int forward_fd, int notify_fd, int space_fd,
                      int wait_when_full, int pid, unsigned long wp_request, const uint64_t *ext_start,
                      const uint64_t *ext_end, const int64_t *ext_base, const uint8_t *ext_huge,
                      int64_t n_ext, uint8_t *state, snapfs_mutex *lock, uint8_t *pages,
                      uint64_t *records, uint64_t capacity, uint64_t *counters)
{
    struct ledger l = {ext_start, ext_end, ext_base, ext_huge, n_ext, state, lock};
    struct pollfd fds[2] = {{.fd = uffd, .events = POLLIN}, {.fd = stop_fd, .events = POLLIN}};
    struct uffd_msg msgs[MAX_MSGS];
    int64_t exts[MAX_MSGS];
    const struct timespec kick = {0, KICK_NS};
    int served = 0; /* faults served since the last wait: wait with the kick timeout */
    for (;;) {
        int ready = ppoll(fds, 2, served ? &kick : NULL, NULL);
        served = 0;
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (ready == 0)
            continue;
        if (fds[1].revents)
            return 0;
        if (fds[0].revents & POLLNVAL)
            return -EBADF;
        ssize_t got = read(uffd, msgs, sizeof msgs);
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            return -errno;
        }
        int n = (int)(got / MSG_SIZE);
        if (n == 0)
            continue;
        /* Only batches made of simple faults are served here (a batch with an event must
         * be handled events first, by Python). */
        int simple = 1;
        for (int i = 0; simple && i < n; i++) {
            exts[i] = msgs[i].event == EVENT_PAGEFAULT ? find_extent(&l, msgs[i].a1) : -1;
            simple = exts[i] >= 0 && !l.huge[exts[i]];
        }
        uint64_t head = __atomic_load_n(&counters[0], __ATOMIC_RELAXED);
        uint64_t tail = __atomic_load_n(&counters[1], __ATOMIC_ACQUIRE);
        if (simple && wait_when_full) {
            int err = wait_for_room(head, &tail, n, capacity, space_fd, stop_fd, notify_fd, counters);
            if (err)
                return err == STOPPED ? 0 : err;
        } else if (simple && head - tail + (uint64_t)n > capacity) {
            simple = 0;
        }
        if (!simple) {
            int err = write_all(forward_fd, stop_fd, msgs, (size_t)n * MSG_SIZE);
            if (err)
                return err == STOPPED ? 0 : err;
            continue;
        }
        int published = 0;
        for (int i = 0; i < n; i++) {
            uint64_t addr = msgs[i].a1 & ~(PAGE - 1);
            int64_t e = exts[i];
            int64_t slot = l.base[e] + (int64_t)((addr - l.start[e]) / PAGE);
            int r = snapfs_serve_page(pid, uffd, wp_request, addr, slot, l.state, l.lock,
                                      pages + (head % capacity) * PAGE);
            if (r < 0)
                return r;
            if (r & SNAPFS_SAVED) {
                records[2 * (head % capacity)] = addr;
                records[2 * (head % capacity) + 1] = (uint64_t)e;
                head++;
                __atomic_store_n(&counters[0], head, __ATOMIC_RELEASE);
                published = 1;
            }
            if (r & SNAPFS_BUSY) { /* Python retries the unprotect */
                int err = write_all(forward_fd, stop_fd, &msgs[i], MSG_SIZE);
                if (err)
                    return err == STOPPED ? 0 : err;
                continue;
            }
            __atomic_fetch_add(&counters[2], 1, __ATOMIC_RELAXED);
            served = 1;
        }
        if (published && __atomic_exchange_n(&counters[3], 0, __ATOMIC_ACQ_REL)) {
            uint64_t one = 1;
            int err = write_all(notify_fd, stop_fd, &one, sizeof one);
            if (err)
                return err == STOPPED ? 0 : err;
        }
    }
}
