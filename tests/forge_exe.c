/* forge_exe: make /proc/self/exe name a trusted program without running it,
 * then open a file and print it (tests/test_exe_forgery.py).
 *
 *   forge_exe [--share-mm] TRUSTED FILE      (run through the dynamic loader:
 *   /lib64/ld-linux-x86-64.so.2 ./forge_exe TRUSTED FILE)
 *
 * As any unprivileged user: in a user namespace of its own the process holds
 * CAP_SYS_ADMIN there, which is all prctl(PR_SET_MM, PR_SET_MM_MAP) asks for
 * to replace mm->exe_file (kernel/sys.c prctl_set_mm_map).  The kernel only
 * refuses while the old executable is still mapped (replace_mm_exe_file:
 * EBUSY), so the program is started through the dynamic loader, whose file is
 * then the "executable", and unmaps the loader before the prctl: no
 * LD_PRELOAD, no ptrace, the trusted binary is never run.
 *
 * --share-mm: the process itself stays in the user namespace it started in;
 * a child made with clone(CLONE_VM | CLONE_NEWUSER), which shares its memory
 * (and so its exe link), does the prctl and exits; the parent then opens the
 * file.  Prints "forged" on stderr once the exe link is replaced.
 *
 * Compiled with -Wl,-z,now so that no call after the loader is gone goes
 * through it; after the unmap it calls only libc's syscall() and strlen(),
 * which need nothing of the loader.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/prctl.h>

static struct prctl_mm_map map;
static unsigned long ranges[64][2];
static int n_ranges;
static int exe_fd;
static char child_stack[65536] __attribute__((aligned(16)));
static volatile int child_rc = 99;

static long sys(long n, long a, long b, long c, long d, long e)
{
	return syscall(n, a, b, c, d, e);
}

static void say(const char *s)
{
	sys(SYS_write, 2, (long)s, (long)strlen(s), 0, 0);
}

static void fail(const char *s)
{
	say(s);
	sys(SYS_exit_group, 3, 0, 0, 0, 0);
}

static void fail_errno(const char *s, int e)
{
	char num[4] = {'0' + e / 100 % 10, '0' + e / 10 % 10, '0' + e % 10, '\n'};
	say(s);
	sys(SYS_write, 2, (long)num, 4, 0, 0);
	sys(SYS_exit_group, 3, 0, 0, 0, 0);
}

/* The mm fields prctl_set_mm_map checks, as the kernel shows them now. */
static void read_map(void)
{
	char buf[4096], *p;
	unsigned long v[52] = {0};
	int fd = open("/proc/self/stat", O_RDONLY), i;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		fail("cannot read /proc/self/stat\n");
	buf[n] = 0;
	p = strrchr(buf, ')') + 4; /* field 4 onwards (3 is the state letter) */
	for (i = 4; i <= 51 && *p; i++) {
		v[i] = strtoul(p, &p, 10);
		while (*p == ' ')
			p++;
		if (*p == '-') /* (signed fields) */
			p++;
	}
	map.start_code = v[26];
	map.end_code = v[27];
	map.start_stack = v[28];
	map.start_data = v[45];
	map.end_data = v[46];
	map.start_brk = v[47];
	map.arg_start = v[48];
	map.arg_end = v[49];
	map.env_start = v[50];
	map.env_end = v[51];
	map.brk = (unsigned long)sys(SYS_brk, 0, 0, 0, 0, 0);
	map.auxv = 0;
	map.auxv_size = 0;
}

/* The mappings of the current executable (the dynamic loader). */
static void find_exe_ranges(void)
{
	char exe[4096], line[4096];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	FILE *f = fopen("/proc/self/maps", "r");
	if (n <= 0 || !f)
		fail("cannot read /proc/self\n");
	exe[n] = 0;
	while (fgets(line, sizeof line, f) && n_ranges < 64) {
		char *path = strchr(line, '/');
		unsigned long lo, hi;
		if (!path)
			continue;
		path[strcspn(path, "\n")] = 0;
		if (strcmp(path, exe) == 0 && sscanf(line, "%lx-%lx", &lo, &hi) == 2) {
			ranges[n_ranges][0] = lo;
			ranges[n_ranges][1] = hi - lo;
			n_ranges++;
		}
	}
	fclose(f);
}

static int forge(void)
{
	int i;
	long rc;
	for (i = 0; i < n_ranges; i++)
		sys(SYS_munmap, (long)ranges[i][0], (long)ranges[i][1], 0, 0, 0);
	map.exe_fd = (unsigned)exe_fd;
	rc = sys(SYS_prctl, PR_SET_MM, PR_SET_MM_MAP, (long)&map, sizeof map, 0);
	return rc == 0 ? 0 : errno;
}

static int child(void *arg)
{
	(void)arg;
	child_rc = forge();
	return 0;
}

int main(int argc, char **argv)
{
	int share = argc > 1 && strcmp(argv[1], "--share-mm") == 0;
	static char out[65536];
	long n, fd;
	if (argc != 3 + share) {
		fprintf(stderr, "usage: forge_exe [--share-mm] TRUSTED FILE\n");
		return 2;
	}
	exe_fd = open(argv[1 + share], O_RDONLY | O_CLOEXEC);
	if (exe_fd < 0) {
		perror("open trusted");
		return 2;
	}
	find_exe_ranges();
	if (!share && unshare(CLONE_NEWUSER) != 0) {
		perror("unshare(CLONE_NEWUSER)");
		return 2;
	}
	read_map();
	if (share) {
		/* (the child runs on its own stack in this very address space) */
		int pid = clone(child, child_stack + sizeof child_stack,
				CLONE_VM | CLONE_NEWUSER | SIGCHLD, NULL);
		if (pid < 0)
			fail("clone(CLONE_VM | CLONE_NEWUSER) failed\n");
		sys(SYS_wait4, pid, 0, 0, 0, 0);
		if (child_rc != 0)
			fail_errno("prctl(PR_SET_MM_MAP) failed in the child: errno ", child_rc);
	} else if ((child_rc = forge()) != 0) {
		fail_errno("prctl(PR_SET_MM_MAP) failed: errno ", child_rc);
	}
	say("forged\n");
	fd = sys(SYS_open, (long)argv[2 + share], O_RDONLY, 0, 0, 0);
	if (fd < 0)
		fail("open: refused\n");
	while ((n = sys(SYS_read, fd, (long)out, sizeof out, 0, 0)) > 0)
		sys(SYS_write, 1, (long)out, n, 0, 0);
	sys(SYS_exit_group, n < 0 ? 4 : 0, 0, 0, 0, 0);
	return 0;
}
