#!/bin/sh
# customize-rootfs.sh RELEASE
#
# Runs inside the new root filesystem (chroot, as its root; under mmdebstrap
# --mode=unshare that root is the build user's user namespace): applies the banger
# guest configuration to a freshly bootstrapped Debian. Called by build-rootfs.sh
# after the kernel modules and the overlay (guest/rootfs/) were unpacked.
set -eu

RELEASE=$1
log() { echo "build-rootfs: customize: $*" >&2; }

# Kernel modules: kmod's depmod writes the .bin indexes.
depmod -a "$RELEASE"

systemctl enable banger-guest-setup.service banger-growfs.service \
    systemd-networkd.service ssh.service
# The work disk is mounted at /root: keep the image's /root empty (mountpoint).
find /root -mindepth 1 -delete

# Units that are useless in a banger microVM (no VGA, no RTC sync, no apt
# maintenance, nobody logs in on a console: root's password is locked).
for u in getty@.service serial-getty@.service console-getty.service \
         systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer \
         dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
         systemd-pstore.service systemd-networkd-wait-online.service \
         systemd-hwdb-update.service systemd-update-utmp-runlevel.service \
         ssh.socket; do
    ln -sf /dev/null "/etc/systemd/system/$u"
done

# Never bake SSH host keys into the image, and make sure nothing regenerates
# them at boot (Debian generates them only in openssh-server's postinst, but
# mask any *keygen* unit a future package might add).
rm -f /etc/ssh/ssh_host_*
for u in /lib/systemd/system/*keygen*.service; do
    [ -e "$u" ] && ln -sf /dev/null "/etc/systemd/system/${u##*/}"
done

# Locked root password (key-only SSH). Unique machine-id generated on first
# boot of each VM (empty file => systemd writes a fresh one, rw root).
passwd -l root >/dev/null
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
ln -sf /etc/machine-id /var/lib/dbus/machine-id

# Build-host leftovers; guest-setup writes these per VM.
echo banger > /etc/hostname
rm -f /etc/resolv.conf
: > /etc/resolv.conf
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > /etc/hosts

# The dpkg excludes reach the guest through the overlay's dpkg.cfg.d file;
# mmdebstrap's own copy of them goes.
rm -f /etc/dpkg/dpkg.cfg.d/99mmdebstrap

# mmdebstrap itself then empties the apt lists and caches and /tmp (where this
# script and its apt configuration live).
rm -rf /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/* /var/tmp/*
log "done"
