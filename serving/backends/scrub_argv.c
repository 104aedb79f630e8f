/* Preloaded into tritonserver by serving.server.EmbeddedTriton: hides the model-control key.
 *
 * Triton 2.51 takes the restricted-API key on its command line, and /proc/<pid>/cmdline is readable
 * by every local user. glibc runs ELF constructors with (argc, argv, envp) before main(): this one
 * moves the two restricted-API arguments to heap copies (main() then parses the copies) and
 * overwrites the original argument memory, which is what /proc/<pid>/cmdline shows, with 'x'.
 */
#include <stdlib.h>
#include <string.h>

static const char *const SECRET_OPTIONS[] = {"--grpc-restricted-protocol=", "--http-restricted-api="};

__attribute__((constructor)) static void fer_scrub_argv(int argc, char **argv, char **envp) {
    (void)envp;
    for (int i = 1; i < argc; i++) {
        for (size_t k = 0; k < sizeof(SECRET_OPTIONS) / sizeof(SECRET_OPTIONS[0]); k++) {
            size_t prefix = strlen(SECRET_OPTIONS[k]);
            if (strncmp(argv[i], SECRET_OPTIONS[k], prefix) == 0) {
                char *copy = strdup(argv[i]);
                if (copy == NULL) continue;
                memset(argv[i] + prefix, 'x', strlen(argv[i]) - prefix);
                argv[i] = copy;
            }
        }
    }
}
