/* Preloaded into tritonserver (serving.server.EmbeddedTriton, docker/scripts/triton.sh): keeps the
 * model-control key out of the process table.
 *
 * Triton 2.51 takes the restricted-API key only on its command line (no file or environment
 * option), and /proc/<pid>/cmdline is readable by every local user. glibc runs ELF constructors
 * with (argc, argv, envp) before main(), and main() parses whatever argv[i] then points to; this
 * constructor handles the two restricted-API options:
 *
 *  - a value "<apis>:<header>=@FER_TRITON_KEY_FILE" (the placeholder): the key is read from the file
 *    named by the environment variable FER_TRITON_KEY_FILE and put into a heap copy of the argument.
 *    The key is then never in the argument memory /proc/<pid>/cmdline shows, not even between
 *    execve() and this constructor. A placeholder that cannot be filled (variable unset, file
 *    unreadable, shorter than 32 characters) ends the process with exit status 78: a server whose
 *    key were the placeholder text would let anyone who reads this comment control it.
 *  - any other value (an inline key): moved to a heap copy and the original overwritten with 'x'
 *    (it was visible for the microseconds between execve() and this constructor).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *const SECRET_OPTIONS[] = {"--grpc-restricted-protocol=", "--http-restricted-api="};
static const char PLACEHOLDER[] = "=@FER_TRITON_KEY_FILE";
enum { MIN_KEY = 32, MAX_KEY = 1024, EXIT_CONFIG = 78 };

static void fail(const char *why) {
    fprintf(stderr, "fer argv scrubber: %s; refusing to start without the model-control key\n", why);
    _exit(EXIT_CONFIG);
}

/* The argument with its trailing placeholder replaced by the key file's first line. */
static char *with_key_from_file(const char *arg, size_t keep) {
    const char *path = getenv("FER_TRITON_KEY_FILE");
    if (path == NULL || *path == '\0') fail("FER_TRITON_KEY_FILE is not set");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail("cannot open FER_TRITON_KEY_FILE");
    char key[MAX_KEY + 1];
    size_t length = 0;
    ssize_t got;
    while (length < MAX_KEY && (got = read(fd, key + length, MAX_KEY - length)) > 0) length += (size_t)got;
    close(fd);
    while (length > 0 && (key[length - 1] == '\n' || key[length - 1] == '\r' || key[length - 1] == ' ')) length--;
    if (memchr(key, '\n', length) != NULL || length < MIN_KEY) fail("FER_TRITON_KEY_FILE does not hold a valid key");
    char *copy = malloc(keep + 1 + length + 1);
    if (copy == NULL) fail("out of memory");
    memcpy(copy, arg, keep);
    copy[keep] = '=';
    memcpy(copy + keep + 1, key, length);
    copy[keep + 1 + length] = '\0';
    memset(key, 0, sizeof key);
    return copy;
}

__attribute__((constructor)) static void fer_scrub_argv(int argc, char **argv, char **envp) {
    (void)envp;
    size_t placeholder = strlen(PLACEHOLDER);
    for (int i = 1; i < argc; i++) {
        for (size_t k = 0; k < sizeof(SECRET_OPTIONS) / sizeof(SECRET_OPTIONS[0]); k++) {
            size_t prefix = strlen(SECRET_OPTIONS[k]);
            if (strncmp(argv[i], SECRET_OPTIONS[k], prefix) != 0) continue;
            size_t length = strlen(argv[i]);
            if (length >= prefix + placeholder && strcmp(argv[i] + length - placeholder, PLACEHOLDER) == 0) {
                argv[i] = with_key_from_file(argv[i], length - placeholder);
                continue;
            }
            char *copy = strdup(argv[i]);
            if (copy == NULL) fail("out of memory");
            memset(argv[i] + prefix, 'x', length - prefix);
            argv[i] = copy;
        }
    }
}
