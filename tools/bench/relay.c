/*
 * relay: the minimal C relay mcmw is measured against. Same shape as an mcmw node,
 * none of its features:
 *
 *   TAP --read() per frame--> keep IPv4 multicast (not 224.0.0.0/24), TTL - 1 with an
 *   incremental checksum (RFC 1624) --sendto() per packet--> UDP to the peer relay
 *   UDP --recv() per packet--> prepend Ethernet (01:00:5e + low 23 bits of the group,
 *   fixed source MAC) --write() per frame--> TAP
 *
 * No batching syscalls on purpose: one syscall per packet per direction is the floor
 * the mcmw design also aims at ("send with one syscall per destination").
 *
 * The relay creates the TAP (IFF_TAP | IFF_NO_PI) and prints {"ready": true}; the
 * harness then gives it an address, routes and sysctls. On SIGTERM/SIGINT it prints
 * its counters as JSON and exits (the TAP goes away with the fd).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define FRAME_MAX 2048
#define BATCH 64 /* frames per wake-up per direction, so neither side starves the other */

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static int parse_addr(const char *s, struct sockaddr_in *out)
{
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host) return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)atoi(colon + 1));
    return inet_pton(AF_INET, host, &out->sin_addr) == 1 ? 0 : -1;
}

static int open_tap(const char *name)
{
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) { close(fd); return -1; }
    return fd;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: relay TAPNAME LISTEN_IP:PORT PEER_IP:PORT\n");
        return 2;
    }
    struct sockaddr_in listen_at, peer;
    if (parse_addr(argv[2], &listen_at) < 0 || parse_addr(argv[3], &peer) < 0) {
        fprintf(stderr, "relay: bad address\n");
        return 2;
    }
    int tap = open_tap(argv[1]);
    if (tap < 0) { perror("relay: tap"); return 1; }
    int udp = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (udp < 0) { perror("relay: socket"); return 1; }
    /* Big buffers on the peer socket, like the receiver's: loss should come from the
     * relay not keeping up, not from a default-sized queue absorbing a burst. */
    int big = 8 << 20;
    setsockopt(udp, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    setsockopt(udp, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big);
    if (bind(udp, (struct sockaddr *)&listen_at, sizeof listen_at) < 0) {
        perror("relay: bind");
        return 1;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    printf("{\"ready\": true}\n");
    fflush(stdout);

    /* Frames are built in place: the IP packet from the peer lands at buf + 14 and the
     * Ethernet header is written in front of it. */
    static unsigned char buf[FRAME_MAX];
    const unsigned char src_mac[6] = {0x02, 0x6d, 0x63, 0x6d, 0x77, 0x01};
    unsigned long long tap_in = 0, sent = 0, skipped = 0, udp_in = 0, tap_out = 0, errors = 0;
    struct pollfd pfd[2] = {{.fd = tap, .events = POLLIN}, {.fd = udp, .events = POLLIN}};

    while (!stop) {
        if (poll(pfd, 2, 200) < 0) {
            if (errno == EINTR) continue;
            perror("relay: poll");
            return 1;
        }
        for (int i = 0; i < BATCH; i++) {
            ssize_t n = read(tap, buf, sizeof buf);
            if (n < 0) break; /* EAGAIN: drained */
            tap_in++;
            unsigned char *ip = buf + 14;
            /* EtherType IPv4, IHL sane, destination 224/4 but not 224.0.0.0/24, TTL > 1. */
            if (n < 34 || buf[12] != 0x08 || buf[13] != 0x00 || (ip[0] >> 4) != 4 ||
                (ip[16] & 0xf0) != 0xe0 || (ip[16] == 224 && ip[17] == 0 && ip[18] == 0) ||
                ip[8] <= 1) {
                skipped++;
                continue;
            }
            /* TTL is the high byte of header word 4: TTL - 1 lowers the one's-complement
             * sum by 0x0100, so the checksum rises by 0x0100 (end-around carry). */
            ip[8]--;
            uint32_t sum = (uint32_t)((ip[10] << 8) | ip[11]) + 0x0100;
            sum = (sum & 0xffff) + (sum >> 16);
            ip[10] = (unsigned char)(sum >> 8);
            ip[11] = (unsigned char)sum;
            if (sendto(udp, ip, (size_t)n - 14, 0, (struct sockaddr *)&peer, sizeof peer) < 0)
                errors++;
            else
                sent++;
        }
        for (int i = 0; i < BATCH; i++) {
            ssize_t n = recv(udp, buf + 14, sizeof buf - 14, 0);
            if (n < 0) break;
            udp_in++;
            unsigned char *ip = buf + 14;
            if (n < 20 || (ip[0] >> 4) != 4) { skipped++; continue; }
            buf[0] = 0x01; buf[1] = 0x00; buf[2] = 0x5e;
            buf[3] = ip[17] & 0x7f; buf[4] = ip[18]; buf[5] = ip[19];
            memcpy(buf + 6, src_mac, 6);
            buf[12] = 0x08; buf[13] = 0x00;
            if (write(tap, buf, (size_t)n + 14) < 0)
                errors++;
            else
                tap_out++;
        }
    }
    printf("{\"tap_in\": %llu, \"sent\": %llu, \"udp_in\": %llu, \"tap_out\": %llu, "
           "\"skipped\": %llu, \"errors\": %llu}\n",
           tap_in, sent, udp_in, tap_out, skipped, errors);
    return 0;
}
