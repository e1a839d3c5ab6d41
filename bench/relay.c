/*
 * bench/relay.c: the byte relay of bench/rawvm.py's client proxy, in C.
 *
 * ferry's --expose relays a client's bytes in native code, a thread per
 * direction (ferry_net::expose::copy_half). rawvm.py's proxy did the same
 * in Python, which costs little on a real CPU but a great deal in the KVM
 * lab, whose CPU is emulated: there a client's writes through the raw
 * engine's proxy came at a sixth of the rate ferry's carried (bench/migrate,
 * acknowledged writes per second), so the raw engine's guest carried a
 * sixth of the load and its live copies had the lab's one CPU nearly to
 * themselves. The same relay in native code makes the client's path alike
 * on both sides. rawvm.py compiles this with `cc` (target/bench-relay/)
 * and calls relay() through ctypes, which lets go of Python's lock for
 * the call.
 */
#include <errno.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

struct half {
    int from, to;
};

/* Copies until end of file or an error, then ends the other side's
 * sending half, as ferry's copy_half does. */
static void *copy_half(void *arg)
{
    const struct half *h = arg;
    char buf[65536];
    for (;;) {
        ssize_t n = read(h->from, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        const char *p = buf;
        while (n > 0) {
            ssize_t w = write(h->to, p, (size_t)n);
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0)
                goto out;
            p += w;
            n -= w;
        }
    }
out:
    shutdown(h->to, SHUT_WR);
    return NULL;
}

/* Relays both ways between the connected sockets a and b; returns once
 * both directions have ended (0), or -1 if no thread could be made. */
int relay(int a, int b)
{
    struct half ab = {a, b}, ba = {b, a};
    pthread_t t;
    if (pthread_create(&t, NULL, copy_half, &ba) != 0)
        return -1;
    copy_half(&ab);
    pthread_join(t, NULL);
    return 0;
}
