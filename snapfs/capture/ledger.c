/* The ledger's lock and claims (ledger.h). The lock is held for a few byte operations,
 * never across a syscall. */
#include <pthread.h>
#include <stdlib.h>

#include "ledger.h"

struct snapfs_mutex {
    pthread_mutex_t mutex;
};

snapfs_mutex *snapfs_mutex_new(void)
{
    snapfs_mutex *lock = malloc(sizeof *lock);
    if (lock != NULL)
        pthread_mutex_init(&lock->mutex, NULL);
    return lock;
}

void snapfs_mutex_free(snapfs_mutex *lock)
{
    if (lock != NULL) {
        pthread_mutex_destroy(&lock->mutex);
        free(lock);
    }
}

int64_t snapfs_claim(uint8_t *state, int64_t n, const uint8_t *ok, uint8_t to,
                     snapfs_mutex *lock, uint8_t *mine)
{
    int64_t claimed = 0;
    pthread_mutex_lock(&lock->mutex);
    for (int64_t i = 0; i < n; i++) {
        uint8_t take = state[i] == 0 && (ok == NULL || ok[i]);
        if (take)
            state[i] = to;
        mine[i] = take;
        claimed += take;
    }
    pthread_mutex_unlock(&lock->mutex);
    return claimed;
}

int snapfs_claim_one(uint8_t *state, int64_t slot, snapfs_mutex *lock)
{
    int mine = 0;
    pthread_mutex_lock(&lock->mutex);
    if (state[slot] == 0) {
        state[slot] = 1;
        mine = 1;
    }
    pthread_mutex_unlock(&lock->mutex);
    return mine;
}
