/*
 * mcsend: send COUNT UDP datagrams to a multicast group at RATE packets/s.
 *
 * Each datagram carries a header {magic, trial id, sequence number} so that the
 * receiver (mcrecv.c) can count unique, duplicate and reordered packets and ignore
 * stragglers from earlier trials. Pacing is absolute (packet i is due at
 * t0 + i/RATE): the sender sleeps with clock_nanosleep(TIMER_ABSTIME) until the next
 * packet is due and then sends everything that is due in one sendmmsg() burst, so a
 * late wake-up never lowers the average rate and the sender leaves the CPU to the
 * forwarders it is measuring (only 2 cores on the bench machine).
 *
 * Prints one JSON object on stdout. Timestamps are CLOCK_MONOTONIC ns, comparable
 * with mcrecv's across network namespaces.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x4d434d57u /* "MCMW" */
#define MAX_BURST 64
#define MAX_SIZE 9000

struct hdr {
    uint32_t magic;
    uint32_t trial;
    uint64_t seq;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_until(uint64_t t)
{
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static void usage(void)
{
    fprintf(stderr, "usage: mcsend -g GROUP -p PORT -n COUNT -r PPS [-s SIZE] [-t TTL] "
                    "[-i IFADDR] [-T TRIAL] [-b BURST]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *group = NULL, *ifaddr = NULL;
    int port = 0, size = 1316, ttl = 16, burst = 32;
    uint64_t count = 0;
    double rate = 0;
    uint32_t trial = 0;
    int c;
    while ((c = getopt(argc, argv, "g:p:n:r:s:t:i:T:b:")) != -1) {
        switch (c) {
        case 'g': group = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'n': count = strtoull(optarg, NULL, 10); break;
        case 'r': rate = atof(optarg); break;
        case 's': size = atoi(optarg); break;
        case 't': ttl = atoi(optarg); break;
        case 'i': ifaddr = optarg; break;
        case 'T': trial = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'b': burst = atoi(optarg); break;
        default: usage();
        }
    }
    if (!group || port <= 0 || count == 0 || rate <= 0 || size < (int)sizeof(struct hdr) ||
        size > MAX_SIZE || burst < 1 || burst > MAX_BURST)
        usage();

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    unsigned char uttl = (unsigned char)ttl, loop = 0;
    setsockopt(fd, IPPROTO_IP, IP_MULTICAST_TTL, &uttl, sizeof uttl);
    /* No local copy: the receiver is in another namespace and a loopback copy would
     * only cost sender CPU. */
    setsockopt(fd, IPPROTO_IP, IP_MULTICAST_LOOP, &loop, sizeof loop);
    if (ifaddr) {
        struct in_addr ifa;
        if (inet_pton(AF_INET, ifaddr, &ifa) != 1) usage();
        if (setsockopt(fd, IPPROTO_IP, IP_MULTICAST_IF, &ifa, sizeof ifa) < 0) {
            perror("IP_MULTICAST_IF");
            return 1;
        }
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, group, &dst.sin_addr) != 1) usage();

    /* One buffer per burst slot: each slot's header carries its own sequence number. */
    static unsigned char bufs[MAX_BURST][MAX_SIZE];
    struct mmsghdr msgs[MAX_BURST];
    struct iovec iov[MAX_BURST];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < MAX_BURST; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = (size_t)size;
        msgs[i].msg_hdr.msg_name = &dst;
        msgs[i].msg_hdr.msg_namelen = sizeof dst;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }

    double interval = 1e9 / rate;
    uint64_t seq = 0, sent = 0, errors = 0, bursts = 0;
    int last_errno = 0;
    double cpu0 = cpu_s();
    uint64_t t0 = now_ns(), first = 0, last = 0;
    while (seq < count) {
        uint64_t now = now_ns();
        /* Packets due by now: seq 0 is due at t0. */
        uint64_t due = (uint64_t)((double)(now - t0) / interval) + 1;
        if (due > count) due = count;
        if (due <= seq) {
            sleep_until(t0 + (uint64_t)((double)seq * interval));
            continue;
        }
        int n = (int)(due - seq < (uint64_t)burst ? due - seq : (uint64_t)burst);
        for (int i = 0; i < n; i++) {
            struct hdr h = {.magic = MAGIC, .trial = trial, .seq = seq + (uint64_t)i};
            memcpy(bufs[i], &h, sizeof h);
        }
        int off = 0;
        while (off < n) {
            int r = sendmmsg(fd, msgs + off, (unsigned)(n - off), 0);
            if (r < 0) {
                if (errno == EINTR) continue;
                /* Drop the packet the stack refused and carry on: the receiver sees a
                 * loss, which is what an application would see. */
                errors++;
                last_errno = errno;
                off++;
                continue;
            }
            sent += (uint64_t)r;
            off += r;
        }
        if (!first) first = now;
        last = now_ns();
        seq += (uint64_t)n;
        bursts++;
    }
    double elapsed = (double)(last - first) / 1e9;
    printf("{\"sent\": %llu, \"errors\": %llu, \"last_errno\": %d, \"bursts\": %llu, "
           "\"target_pps\": %.1f, \"elapsed_s\": %.6f, \"achieved_pps\": %.1f, "
           "\"t_first_ns\": %llu, \"t_last_ns\": %llu, \"cpu_s\": %.6f}\n",
           (unsigned long long)sent, (unsigned long long)errors, last_errno,
           (unsigned long long)bursts, rate, elapsed,
           elapsed > 0 ? (double)(count - 1) / elapsed : 0.0, (unsigned long long)first,
           (unsigned long long)last, cpu_s() - cpu0);
    return 0;
}
