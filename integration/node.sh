# Sourced by demo.sh and bench/stage.sh: the pieces of a test node on this machine.
# Callers keep `loop` and `server` in their EXIT trap (losetup -d, kill).

# make_node_disk DIR V1_IMG: a GPT disk image DIR/disk.img (esp, root-a, root-b,
# state; slots sized for V1_IMG plus 64 MiB) on a loop device, V1_IMG written into
# root-a. Sets `loop`.
make_node_disk() {
  local dir=$1 v1=$2 slot_mib
  slot_mib=$(( $(stat -c %s "$v1") / 1048576 + 64 ))
  truncate -s $(( (2 * slot_mib + 40) * 1048576 )) "$dir/disk.img"
  printf 'label: gpt\nsize=16MiB, type=uefi, name=esp\nsize=%sMiB, name=root-a\nsize=%sMiB, name=root-b\nsize=16MiB, name=state\n' \
    "$slot_mib" "$slot_mib" | sfdisk --quiet "$dir/disk.img"
  loop=$(losetup --find --show --partscan "$dir/disk.img")
  # Some kernels set partscan on loop devices but do not scan; ask explicitly.
  partx --add "$loop" 2>/dev/null || true
  for _ in $(seq 100); do [[ -b ${loop}p3 ]] && break; sleep 0.05; done
  dd if="$v1" of="${loop}p2" bs=4M conv=fsync status=none
}

# start_range_server DIR: serves DIR on 127.0.0.1 with range requests. Sets `port`
# and `server` (the pid) and returns once it accepts connections.
start_range_server() {
  port=$(( 20000 + RANDOM % 20000 ))
  python3 "$(dirname "${BASH_SOURCE[0]}")/range-server.py" "$1" "$port" &
  server=$!
  for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "range server on port $port did not start" >&2
  return 1
}

# write_node_config DIR COMPATIBLE KEYS_DIR: the node's view of itself for a disk
# made by make_node_disk (booted slot a, running 1.0, GRUB with both slots good):
# DIR/cmdline, DIR/os-release, DIR/grubenv and DIR/agent.toml. Callers append tables.
write_node_config() {
  local dir=$1 compatible=$2 keys=$3
  echo "root=PARTLABEL=root-a ro" >"$dir/cmdline"
  echo "VERSION_ID=1.0" >"$dir/os-release"
  grub-editenv "$dir/grubenv" create
  grub-editenv "$dir/grubenv" set ua_default=a ua_a_ok=1 ua_b_ok=1
  cat >"$dir/agent.toml" <<TOML
compatible = "$compatible"
state_dir = "$dir/state"
keys_dir = "$keys"
os_release = "$dir/os-release"
[slots]
cmdline = "$dir/cmdline"
root_device = "${loop}p2"
[boot]
grubenv = "$dir/grubenv"
TOML
}
