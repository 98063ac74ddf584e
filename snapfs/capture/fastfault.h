/*
 * The fault path in C (fastfault.c). Read by _native_build.py as cffi declarations too
 * (see kabi.h).
 */
#ifndef SNAPFS_FASTFAULT_H
#define SNAPFS_FASTFAULT_H
#include <stdint.h>

#include "ledger.h"

/* Serve faults until stop_fd is readable: the common write fault here (while the ring is
 * full: waiting on space_fd, or with wait_when_full 0 forwarding them), everything else
 * forwarded as raw uffd messages on forward_fd.
 * Returns 0, or -errno on a fatal error (-ESRCH: the target is gone). The ring protocol is
 * described in fastfault.c. */
int snapfs_fault_loop(int uffd, int stop_fd, int forward_fd, int notify_fd, int space_fd,
                      int wait_when_full, int pid, unsigned long wp_request, const uint64_t *ext_start,
                      const uint64_t *ext_end, const int64_t *ext_base, const uint8_t *ext_huge,
                      int64_t n_ext, uint8_t *state, snapfs_mutex *lock, uint8_t *pages,
                      uint64_t *records, uint64_t capacity, uint64_t *counters);

/* The consumer took every record before `tail`: publish it, and wake the loop through
 * space_fd if it waits for room. */
void snapfs_ring_taken(uint64_t *counters, uint64_t tail, int space_fd);

enum { SNAPFS_SAVED = 1, SNAPFS_BUSY = 2 };
/* One write fault on the 4 KiB page at addr, served by the calling thread: if its ledger
 * slot (< 0: none) is pending, copy the page into page[4096] and claim it; then unprotect
 * it, which wakes the writer. Returns SNAPFS_SAVED if this call saved the page, plus
 * SNAPFS_BUSY if the unprotect was refused with EAGAIN (retry it once the pending mapping
 * change is read); or -errno (-ESRCH: the target is gone). */
int snapfs_serve_page(int pid, int uffd, unsigned long wp_request, uint64_t addr, int64_t slot,
                      uint8_t *state, snapfs_mutex *lock, uint8_t *page);
#endif
