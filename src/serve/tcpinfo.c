/* What the kernel knows of a TCP socket: whether it sent data, how many
 * bytes it received (its own file: the
 * kernel's tcp_info, which has the field, clashes with <netinet/tcp.h>). */
#include <linux/tcp.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

bool keel__tcp_sent_data(int fd);

bool keel__tcp_sent_data(int fd) {
  struct tcp_info ti;
  socklen_t len = sizeof ti;
  memset(&ti, 0, sizeof ti);
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0) return true; /* say nothing */
  if (len < offsetof(struct tcp_info, tcpi_data_segs_out) + sizeof ti.tcpi_data_segs_out)
    return true;
  return ti.tcpi_data_segs_out != 0;
}

uint64_t keel__tcp_received(int fd);

uint64_t keel__tcp_received(int fd) {
  struct tcp_info ti;
  socklen_t len = sizeof ti;
  memset(&ti, 0, sizeof ti);
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0 ||
      len < offsetof(struct tcp_info, tcpi_bytes_received) + sizeof ti.tcpi_bytes_received)
    return 0;
  return ti.tcpi_bytes_received;
}
