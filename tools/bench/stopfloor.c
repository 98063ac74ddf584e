/*
 * stopfloor: the C floor of stopping every thread of a process with ptrace, for the bench.
 *
 *   stopfloor PID REPEATS
 *
 * Each repeat: PTRACE_SEIZE and PTRACE_INTERRUPT every thread listed in /proc/PID/task, then
 * wait for every stop (waitpid(-1, __WALL)), then PTRACE_DETACH every thread. Prints one JSON
 * line per repeat: {"threads": N, "stop_ms": seize+interrupt+wait, "resume_ms": detach all}.
 * What snapfs does in Python, with nothing else (no injection, no thread listing loop).
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <time.h>

#ifndef PTRACE_SEIZE
#define PTRACE_SEIZE 0x4206
#define PTRACE_INTERRUPT 0x4207
#endif

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: stopfloor PID REPEATS\n");
        return 2;
    }
    int pid = atoi(argv[1]), repeats = atoi(argv[2]);
    static int tids[65536];
    for (int r = 0; r < repeats; r++) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/task", pid);
        DIR *d = opendir(path);
        if (!d) return 3;
        int n = 0;
        struct dirent *e;
        while ((e = readdir(d)) && n < 65536)
            if (e->d_name[0] != '.') tids[n++] = atoi(e->d_name);
        closedir(d);
        double t0 = now_ms();
        int seized = 0;
        for (int i = 0; i < n; i++) {
            if (ptrace(PTRACE_SEIZE, tids[i], 0, 0) == 0 && ptrace(PTRACE_INTERRUPT, tids[i], 0, 0) == 0)
                seized++;
        }
        for (int i = 0; i < seized; i++) {
            int status;
            if (waitpid(-1, &status, __WALL) < 0) return 4;
        }
        double t1 = now_ms();
        for (int i = 0; i < n; i++) ptrace(PTRACE_DETACH, tids[i], 0, 0);
        double t2 = now_ms();
        printf("{\"threads\": %d, \"stop_ms\": %.3f, \"resume_ms\": %.3f}\n", seized, t1 - t0, t2 - t1);
        fflush(stdout);
    }
    return 0;
}
