"""Container health check without curl: ``python healthcheck.py URL [STATUS ...]``.

Exit 0 when URL answers 200 or one of the extra STATUS codes (e.g. 401 for a server behind
basic-auth, which proves it is up without handing the check a password), else 1.
"""

import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: healthcheck.py URL [STATUS ...]", file=sys.stderr)
        return 2
    url, accepted = argv[0], {200, *(int(code) for code in argv[1:])}
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0 if status in accepted else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
