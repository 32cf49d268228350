/* The pod sandbox ("pause") process for a local containerd node without a registry
 * (registry.k8s.io/pause is not pullable): holds the pod's namespaces, reaps orphans, and
 * exits 0 on SIGINT/SIGTERM, like Kubernetes' own build/pause/linux/pause.c.
 * Built static (gcc -static) by hack/get-images.sh into a FROM scratch image. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define VERSION "3.9-fabric"

static void sigdown(int signo) {
  static const char msg[] = "Shutting down, got signal\n";
  (void)signo;
  (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
  _exit(0);
}

static void sigreap(int signo) {
  (void)signo;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    printf("pause.c %s\n", VERSION);
    return 0;
  }
  if (getpid() != 1) fprintf(stderr, "Warning: pause should be the first process\n");

  struct sigaction down = {.sa_handler = sigdown};
  struct sigaction reap = {.sa_handler = sigreap, .sa_flags = SA_NOCLDSTOP};
  if (sigaction(SIGINT, &down, NULL) < 0 || sigaction(SIGTERM, &down, NULL) < 0 ||
      sigaction(SIGCHLD, &reap, NULL) < 0) {
    perror("sigaction");
    return 1;
  }
  for (;;) pause();
  return 42; /* not reached */
}
