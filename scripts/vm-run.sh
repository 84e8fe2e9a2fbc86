#!/usr/bin/env bash
# Boots a guest whose root filesystem is DIR served over virtio-fs, or an EROFS disk image over
# virtio-blk, runs COMMAND in it, prints the guest's output and exits with the command's exit code.
#   vm-run.sh DIR 'COMMAND'                 root: DIR over virtio-fs
#   vm-run.sh --disk FILE 'COMMAND'         root: FILE (EROFS) as a read-only virtio-blk disk,
#                                           writable through an overlay on a tmpfs in the guest
#   vm-run.sh --disk FILE --upper-disk RW 'COMMAND'
#                                           the overlay's upper layer on a second, per-VM disk RW
#                                           (ext4, formatted when new or empty; kept across boots)
#   vm-run.sh --disk FILE --read-only 'COMMAND'   no overlay: the EROFS mount is the root
#   vm-run.sh --prepare        only fetch the kernel into the cache
# In disk mode the guest mounts /dev/vda as erofs and /dev/vdb (--upper-disk) as ext4, which is
# what libkrun does with krun_add_disk + krun_set_root_disk_remount (see docs/disk.md).
# With real KVM (kvm_intel/kvm_amd) QEMU uses it; otherwise software emulation (TCG), which
# reads files at a few MB/s: keep workloads small. Kernel: Debian's cloud kernel, fetched once
# into target/vm ($BUX_VM_CACHE) by root. A user may boot from a prepared cache with the Rust
# virtiofsd unsandboxed: BUX_VIRTIOFSD=PATH BUX_VIRTIOFSD_ARGS=--sandbox=none.
set -euo pipefail
prepare_only=false disk= upper_disk= overlay=tmpfs
if [ "$1" = --prepare ]; then
  prepare_only=true
elif [ "$1" = --disk ]; then
  disk=$(realpath "$2"); shift 2
  while [ $# -gt 1 ]; do
    case $1 in
      --upper-disk) upper_disk=$(realpath -m "$2"); overlay=disk; shift 2 ;;
      --read-only) overlay=none; shift ;;
      *) echo "vm-run: unknown option $1" >&2; exit 2 ;;
    esac
  done
  [ -r "$disk" ] || { echo "vm-run: cannot read the disk $disk" >&2; exit 2; }
  cmd=$1
else
  root=$(realpath "$1"); cmd=$2
fi
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${BUX_VM_CACHE:-$here/target/vm}
mkdir -p "$cache"

need() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=(); for p in qemu-system-x86 busybox-static cpio lz4; do need "$p" || missing+=("$p"); done
if ((${#missing[@]})) && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
virtiofsd=$(command -v virtiofsd || true)
[ -n "$virtiofsd" ] || virtiofsd=/usr/lib/qemu/virtiofsd
[ -x "$virtiofsd" ] || { echo "vm-run: no virtiofsd (install qemu-system-x86)" >&2; exit 3; }

# Kernel: an ELF vmlinux (QEMU boots it directly through its PVH note) and its modules: virtio,
# virtio-fs, virtio-blk, erofs and overlayfs (modules in Debian's cloud kernel), in load order.
# Several VMs may start at once (parallel tests): one prepares the kernel, the others wait.
# A cache from before a module was added is fetched again (kernel and modules stay one version).
modules="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci fuse virtiofs
         virtio_blk libcrc32c erofs overlay"
exec 9>"$cache/.lock"
flock 9
complete=true
for m in $modules; do [ -f "$cache/modules/$m.ko" ] || complete=false; done
if [ ! -f "$cache/vmlinux" ] || ! $complete; then
  rm -rf "$cache/modules"
  (cd "$cache" && rm -rf deb x && mkdir deb && cd deb &&
   pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image/ {print $2; exit}') &&
   apt-get download "$pkg" >/dev/null 2>&1 && dpkg-deb -x ./*.deb ../x)
  python3 - "$cache" <<'PY'
import sys, glob, subprocess
cache = sys.argv[1]
bz = open(glob.glob(f"{cache}/x/boot/vmlinuz-*")[0], "rb").read()
off = bz.find(b"\x02\x21\x4c\x18")  # the LZ4 stream inside the bzImage
out = subprocess.run(["lz4", "-dc"], input=bz[off:], capture_output=True).stdout
assert out[:4] == b"\x7fELF", "no ELF vmlinux in the bzImage"
open(f"{cache}/vmlinux", "wb").write(out)
PY
  mkdir -p "$cache/modules"
  for m in $modules; do
    f=$(find "$cache/x/lib/modules" -name "$m.ko" | head -1)
    [ -n "$f" ] || { echo "vm-run: the kernel package has no $m.ko" >&2; exit 3; }
    cp "$f" "$cache/modules/"
  done
  rm -rf "$cache/deb" "$cache/x"
fi
flock -u 9
$prepare_only && exit 0

# Initramfs: busybox, the modules, an /init that mounts the root (virtio-fs, or the EROFS disk
# with an overlay over it) and runs COMMAND.
vfs_pid=
work=$(mktemp -d); trap 'kill $vfs_pid 2>/dev/null || true; rm -rf "$work"' EXIT
ird=$work/initrd; mkdir -p "$ird"/{bin,proc,sys,dev,newroot,lower,rw,lib/modules}
cp "$(command -v busybox)" "$ird/bin/busybox"
cp "$cache"/modules/* "$ird/lib/modules/"
printf '%s\n' "$cmd" > "$ird/cmd"
echo "$modules" > "$ird/modules"
if [ -n "$disk" ]; then echo "disk $overlay" > "$ird/mode"; else echo fs > "$ird/mode"; fi
cat > "$ird/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules); do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
done
fail() { echo "BUX-VM-EXIT 125 ($1)"; sync; reboot -f; }
wait_dev() { for _ in $(seq 100); do [ -b "$1" ] && return 0; sleep 0.05; done; return 1; }
set -- $(cat /mode)
if [ "$1" = fs ]; then
  mount -t virtiofs rootfs /newroot || fail "virtiofs mount failed"
else
  # The image's disk, read-only: the guest's own EROFS driver answers lookups from its blocks.
  wait_dev /dev/vda || fail "no /dev/vda"
  mount -t erofs -o ro /dev/vda /lower || fail "erofs mount of /dev/vda failed"
  case $2 in
    none) mount --bind /lower /newroot ;;
    tmpfs) mount -t tmpfs -o mode=0755 rw /rw || fail "tmpfs mount failed" ;;
    disk) wait_dev /dev/vdb || fail "no /dev/vdb"
          mount -t ext4 /dev/vdb /rw || fail "ext4 mount of /dev/vdb failed" ;;
  esac
  if [ "$2" != none ]; then
    # Writable root: an overlay, the disk below, changes in /rw above.
    mkdir -p /rw/upper /rw/work
    mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot ||
      fail "overlay mount failed"
  fi
fi
for d in proc sys dev; do [ -d /newroot/$d ] && mount --bind /$d /newroot/$d; done
echo "BUX-VM-START"
chroot /newroot /bin/sh -c "$(cat /cmd)" </dev/null
code=$?
for d in dev sys proc; do umount /newroot/$d 2>/dev/null; done
umount /newroot 2>/dev/null; umount /rw 2>/dev/null
sync
echo "BUX-VM-EXIT $code"
reboot -f
INIT
chmod +x "$ird/init"
(cd "$ird" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$work/initrd.gz")

if [ -n "$disk" ]; then
  # The disk read-only (so any number of VMs may share it), the upper disk read-write.
  dev=(-drive "file=${disk//,/,,},if=none,id=vda,format=raw,readonly=on" -device virtio-blk-pci,drive=vda)
  if [ -n "$upper_disk" ]; then
    if [ ! -s "$upper_disk" ]; then
      truncate -s "${BUX_VM_UPPER_SIZE:-1G}" "$upper_disk"
      mkfs.ext4 -q -F "$upper_disk"
    fi
    dev+=(-drive "file=${upper_disk//,/,,},if=none,id=vdb,format=raw" -device virtio-blk-pci,drive=vdb)
  fi
else
  # virtio-fs server on the root directory. BUX_VIRTIOFSD=PATH selects the Rust virtiofsd, run
  # with one worker thread (--thread-pool-size=0), as libkrun serves virtio-fs.
  sock=$work/vfs.sock
  if [ -n "${BUX_VIRTIOFSD:-}" ]; then
    "$BUX_VIRTIOFSD" --socket-path="$sock" --shared-dir="$root" --cache=auto --xattr \
      --thread-pool-size=0 --inode-file-handles=never ${BUX_VIRTIOFSD_ARGS:-} >"$work/virtiofsd.log" 2>&1 &
  else
    "$virtiofsd" --socket-path="$sock" -o source="$root" -o cache=auto -o xattr >"$work/virtiofsd.log" 2>&1 &
  fi
  vfs_pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
  dev=(-chardev socket,id=vfs,path="$sock" -device vhost-user-fs-pci,queue-size=1024,chardev=vfs,tag=rootfs)
fi

if grep -qE "^kvm_(intel|amd) " /proc/modules 2>/dev/null && [ -w /dev/kvm ]; then
  accel=(-accel kvm -cpu host)
else
  accel=(-accel tcg,thread=multi -cpu max)
fi
khz=$(awk '/^cpu MHz/ {printf "%d", $4 * 1000; exit}' /proc/cpuinfo)
start=$(date +%s.%N)
set +e
timeout "${BUX_VM_TIMEOUT:-600}" qemu-system-x86_64 "${accel[@]}" -M microvm,pcie=on,acpi=on -m 512M -smp 2 \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -kernel "$cache/vmlinux" -initrd "$work/initrd.gz" \
  -append "console=ttyS0 quiet loglevel=1 reboot=t panic=-1 tsc_early_khz=$khz rdinit=/init" \
  "${dev[@]}" \
  -nographic -nodefaults -serial stdio -no-reboot > "$work/console.log" 2>&1
set -e
end=$(date +%s.%N)
tr -d '\r' < "$work/console.log" | sed -n '/BUX-VM-START/,$p'
echo "vm-run: $(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.2f", b - a}') s from launch to exit (${accel[1]})" >&2
code=$(tr -d '\r' < "$work/console.log" | awk '/^BUX-VM-EXIT/ {print $2}' | tail -1)
if [ -z "$code" ]; then
  echo "vm-run: the guest printed no exit marker; console:" >&2; tail -20 "$work/console.log" >&2
  exit 124
fi
exit "$code"
