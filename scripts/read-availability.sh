#!/usr/bin/env bash
# Availability of each read mode on the minority side (docs/read-modes.md): 3 local basaltd
# nodes, write a key, kill 2 of them, then ask the survivor in every mode, 24 rounds 0.5 s apart
# (basaltctl --timeout 1s, so a refused read takes its whole second). Prints per mode how many
# reads were answered and refused, and the last staleness bound reported; the full trace is kept.
# Needs `bc`.
set -u
BIN=${BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/basalt/target}/release}
D=$(mktemp -d)
C=1=127.0.0.1:7601,2=127.0.0.1:7602,3=127.0.0.1:7603
for i in 1 2 3; do
  $BIN/basaltd --node-id $i --listen 127.0.0.1:760$i --metrics-listen 127.0.0.1:860$i --data-dir $D/n$i --initial-cluster $C > $D/n$i.log 2>&1 &
  echo $! > $D/pid$i
done
export BASALT_ENDPOINTS=127.0.0.1:7601,127.0.0.1:7602,127.0.0.1:7603
for t in $(seq 1 50); do $BIN/basaltctl --timeout 2s put k v1 >/dev/null 2>&1 && break; sleep 0.2; done
sleep 1
# the survivor: node 3 unless it leads the default shard... just take node 3
kill -9 $(cat $D/pid1) $(cat $D/pid2)
START=$(date +%s.%N)
declare -A ok fail last
for mode in linearizable lease follower bounded:2s bounded:5s stale; do ok[$mode]=0; fail[$mode]=0; done
for round in $(seq 1 24); do
  for mode in linearizable lease follower bounded:2s bounded:5s stale; do
    if out=$($BIN/basaltctl --endpoints 127.0.0.1:7603 --timeout 1s --read-mode $mode get k 2>&1); then
      ok[$mode]=$((ok[$mode]+1)); last[$mode]=$(echo "$out" | grep -o 'staleness<=[0-9]*ms' | tail -1)
      t=$(echo "$(date +%s.%N) - $START" | bc); echo "t=$t $mode ok ${last[$mode]}" >> $D/trace
    else
      fail[$mode]=$((fail[$mode]+1)); t=$(echo "$(date +%s.%N) - $START" | bc); echo "t=$t $mode FAIL $(echo "$out" | tail -1 | cut -c1-120)" >> $D/trace
    fi
  done
  sleep 0.5
done
for mode in linearizable lease follower bounded:2s bounded:5s stale; do
  first_fail=$(grep " $mode FAIL" $D/trace | head -1 | cut -d' ' -f1)
  last_ok=$(grep " $mode ok" $D/trace | tail -1 | cut -d' ' -f1)
  echo "$mode ok=${ok[$mode]} fail=${fail[$mode]} last_ok=$last_ok first_fail=$first_fail last_bound=${last[$mode]:-}"
done
kill $(cat $D/pid3); wait 2>/dev/null
echo "trace: $D/trace"
