# Sourced by the benchmarks: sets up the machine (setup.sh) and the realistic Debian
# image pair, built once by ../shared/bench/make-image-pair.sh and cached in
# ${1:-/var/tmp/update-agent-bench/pair}. Sets repo, v1, v2.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
repo=$(dirname "$here")
# shellcheck source=../setup.sh
source "$here/setup.sh"
pair=${1:-/var/tmp/update-agent-bench/pair}
maker=${MAKE_IMAGE_PAIR:-$repo/../shared/bench/make-image-pair.sh}
[[ -f $maker ]] || { echo "bench: $maker not found (set MAKE_IMAGE_PAIR)" >&2; exit 1; }
bash "$maker" "$pair" ext4 >/dev/null
v1=$pair/v1.ext4.img
v2=$pair/v2.ext4.img
