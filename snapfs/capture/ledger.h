/*
 * The ledger's C side (ledger.c): its lock and its claims, shared by ledger.py and the fault
 * loop (fastfault.c). Read by _native_build.py as cffi declarations too (see kabi.h).
 *
 * state[] holds one byte per populated page: 0 pending, 1 saved, 2 lost. A claim turns
 * pending pages into another state under the lock; whoever claims a page first stores it.
 */
#ifndef SNAPFS_LEDGER_H
#define SNAPFS_LEDGER_H
#include <stdint.h>

typedef struct snapfs_mutex snapfs_mutex; /* a pthread mutex, opaque to Python */

snapfs_mutex *snapfs_mutex_new(void);
void snapfs_mutex_free(snapfs_mutex *lock);

/* Among state[0..n), the pending pages whose ok[i] is set (ok NULL: all) become `to`;
 * mine[i] says which this call claimed. Returns how many it claimed. */
int64_t snapfs_claim(uint8_t *state, int64_t n, const uint8_t *ok, uint8_t to,
                     snapfs_mutex *lock, uint8_t *mine);
/* Claim one page (saved): 1 if this call claimed it, 0 if it was not pending. */
int snapfs_claim_one(uint8_t *state, int64_t slot, snapfs_mutex *lock);
#endif
