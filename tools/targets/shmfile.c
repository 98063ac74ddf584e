/*
 * shmfile: a memfd whose pages the target never touched through its mapping.
 *
 *   shmfile NPAGES
 *
 * Creates a memfd of NPAGES pages, fills the even pages with write() (page p: every byte
 * (p % 251) + 1), maps it MAP_SHARED without touching it, prints "ready addr=... npages=N".
 * stdin "w": write 0xEE through the mapping into every page, reply "ok w"; "q": exit.
 * A snapshot must show the write()-filled pages even though none was mapped at the freeze.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096

int main(int argc, char **argv) {
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 0) : 256;
    int fd = memfd_create("shmfile", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, n * PAGE) < 0) return 1;
    char page[PAGE];
    for (size_t p = 0; p < n; p += 2) {
        memset(page, (int)(p % 251) + 1, PAGE);
        if (pwrite(fd, page, PAGE, p * PAGE) != PAGE) return 1;
    }
    char *map = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) return 1;
    printf("ready addr=%p npages=%zu\n", (void *)map, n);
    fflush(stdout);
    char line[16];
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'q') return 0;
        if (line[0] == 'w') {
            memset(map, 0xEE, n * PAGE);
            printf("ok w\n");
            fflush(stdout);
        }
    }
    return 0;
}
