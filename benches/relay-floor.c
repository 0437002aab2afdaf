// The floor under M4 (benches/compare): a TCP relay that does no work at all. Plain bytes, no
// TLS, no event loop, no parsing: one blocking thread per direction that reads and writes. Run
// on the proxy core between the ping generator and the sink, its added round trip is what any
// proxy that sleeps while it waits pays on this machine, before doing anything of its own.
//
// Usage: relay-floor LISTEN_PORT TARGET_PORT   (both on 127.0.0.1)
// Build: cc -O2 -pthread benches/relay-floor.c -o relay-floor
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int target_port;

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

struct pipe_ends {
    int from, to;
};

// One direction: read what comes, write all of it, pass the EOF on.
static void *copy(void *arg) {
    struct pipe_ends *p = arg;
    char buf[16384];
    for (;;) {
        ssize_t n = read(p->from, buf, sizeof buf);
        if (n <= 0)
            break;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(p->to, buf + off, (size_t)(n - off));
            if (w <= 0)
                goto done;
            off += w;
        }
    }
done:
    shutdown(p->to, SHUT_WR);
    return NULL;
}

static void *connection(void *arg) {
    int client = (int)(long)arg;
    int server = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = loopback(target_port);
    if (server < 0 || connect(server, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("relay-floor: connect");
        close(client);
        if (server >= 0)
            close(server);
        return NULL;
    }
    nodelay(client);
    nodelay(server);
    struct pipe_ends up = {client, server}, down = {server, client};
    pthread_t t;
    if (pthread_create(&t, NULL, copy, &up) != 0) {
        close(client);
        close(server);
        return NULL;
    }
    copy(&down);
    pthread_join(t, NULL);
    close(client);
    close(server);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: relay-floor LISTEN_PORT TARGET_PORT\n");
        return 2;
    }
    target_port = atoi(argv[2]);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = loopback(atoi(argv[1]));
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) != 0 || listen(l, 64) != 0) {
        perror("relay-floor: listen");
        return 1;
    }
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0)
            continue;
        pthread_t t;
        if (pthread_create(&t, NULL, connection, (void *)(long)c) != 0) {
            close(c);
            continue;
        }
        pthread_detach(t);
    }
}
