/* LD_PRELOAD shim for tests/rotation_atomic.rs: the token directory "turns read-only"
 * after CMKP11_TEST_RO_AFTER new object files. Every later creation of a file ending in
 * ".object" that does not exist yet fails with EROFS, as on a file system remounted
 * read-only; everything else (reads, rewrites, the audit log) goes on. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static int created;

static int refused(const char *path, int flags)
{
    const char *after = getenv("CMKP11_TEST_RO_AFTER");
    size_t n;
    if (after == NULL || path == NULL || !(flags & O_CREAT))
        return 0;
    n = strlen(path);
    if (n < 7 || strcmp(path + n - 7, ".object") != 0 || access(path, F_OK) == 0)
        return 0;
    if (created >= atoi(after))
        return 1;
    created++;
    return 0;
}

typedef int (*open_fn)(const char *, int, ...);

static int forward(const char *name, const char *path, int flags, mode_t mode)
{
    open_fn real = (open_fn)dlsym(RTLD_NEXT, name);
    if (refused(path, flags)) {
        errno = EROFS;
        return -1;
    }
    return real(path, flags, mode);
}

int open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (flags & O_CREAT) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    return forward("open", path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (flags & O_CREAT) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    return forward("open64", path, flags, mode);
}
