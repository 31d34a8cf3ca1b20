#!/bin/sh
# The Debian packages of the given roles, one line, from deploy/apt-packages.txt (the single list).
#   deploy/packages.sh build data stack
set -eu
[ "$#" -gt 0 ] || { echo "usage: $0 ROLE..." >&2; exit 2; }
awk -v roles="$*" 'BEGIN { n = split(roles, want, " ") }
  /^[[:space:]]*(#|$)/ { next }
  { for (i = 2; i <= NF; i++) for (j = 1; j <= n; j++) if ($i == want[j]) { print $1; next } }' \
  "$(dirname "$0")/apt-packages.txt" | tr '\n' ' ' | sed 's/ $//'
echo
