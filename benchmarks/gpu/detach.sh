#!/usr/bin/env bash
# On the GPU machine: run a command detached (its own session, so it outlives the device call) from a private
# copy of this checkout, so that the next calls of a lease (wheel-part transfers, polls) go on while it runs.
# A device call carries <= 64 MiB, so an engine arrives in ~10 calls; a sweep or serve stage can run meanwhile.
#
#   bash benchmarks/gpu/detach.sh NAME 'COMMAND'     # from the repository root; COMMAND runs in the copy
#   cat /root/jobs/NAME.rc; tail /root/jobs/NAME.log # rc appears when it has ended
set -u
name=${1:?usage: detach.sh NAME COMMAND}
cmd=${2:?usage: detach.sh NAME COMMAND}
tree=/root/jobs/tree-$name
mkdir -p "$tree" && rm -f "/root/jobs/$name.rc"
tar --exclude=./.gpu-wheels --exclude=./.git --exclude="./.venv*" -cf - . | tar -xf - -C "$tree"
cd "$tree" && setsid nohup bash -c "$cmd; echo \$? > /root/jobs/$name.rc" > "/root/jobs/$name.log" 2>&1 < /dev/null &
echo "started $name (pid $!) in $tree"
