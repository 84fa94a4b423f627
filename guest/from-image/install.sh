#!/bin/sh
# install.sh PACKAGE...
#
# Runs inside a container image's root filesystem (chroot, as its root; under mmdebstrap
# --mode=unshare that root is the build user's user namespace): the image's own apt-get
# installs PACKAGE... from the source list in /tmp/banger-sources.list (the host's mirror;
# the image's own sources are not read, nor changed). Name resolution comes from the host's
# resolv.conf, for the build only.
set -eu

log() { echo "build-rootfs: install: $*" >&2; }

had_resolv=no
if [ -e /etc/resolv.conf ] || [ -L /etc/resolv.conf ]; then
    had_resolv=yes
    mv /etc/resolv.conf /tmp/banger-resolv.conf.image
fi
cp /tmp/banger-resolv.conf /etc/resolv.conf

export DEBIAN_FRONTEND=noninteractive
apt() {
    apt-get -o Dir::Etc::SourceList=/tmp/banger-sources.list \
        -o Dir::Etc::SourceParts=/tmp/banger-none -o Acquire::Languages=none \
        -o APT::Install-Recommends=false "$@" >>/tmp/banger-apt.log 2>&1 \
        || { tail -n 20 /tmp/banger-apt.log >&2; exit 1; }
}
# Services must not start inside the build.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
log "apt-get update"
apt update
log "apt-get install $*"
apt -y install "$@"
apt-get clean
rm -f /usr/sbin/policy-rc.d /etc/resolv.conf
if [ "$had_resolv" = yes ]; then
    mv /tmp/banger-resolv.conf.image /etc/resolv.conf
fi
log "done"
