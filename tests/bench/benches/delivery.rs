//! Criterion view of scenarios a and b, for digging into one variant (`cargo bench -p
//! jobhook-bench --profile bench-host -- <filter>`). The figures `docs/PERFORMANCE.md` quotes
//! come from the `jobhook-bench` binary, which interleaves the variants and prints ratios.

use criterion::{Criterion, criterion_group, criterion_main};
use jobhook_bench::delivery::DeliveryRig;
use jobhook_bench::peer::{ExtismPeer, PeerCall};

fn deliveries(c: &mut Criterion) {
    let rig = match DeliveryRig::new() {
        Ok(rig) => rig,
        Err(e) => panic!("cannot set up the delivery benchmark: {e:#}"),
    };
    let mut group = c.benchmark_group("delivery");
    group.bench_function("jobhook_invoke_noop", |b| {
        b.iter(|| rig.runtime.block_on(rig.deliver(&rig.noop)))
    });
    group.bench_function("baseline_on_demand_plain_instantiate", |b| {
        b.iter(|| rig.runtime.block_on(rig.baseline.call(&rig.context)))
    });
    group.bench_function("floor_pooled_instance_pre", |b| {
        b.iter(|| rig.runtime.block_on(rig.floor.call(&rig.context)))
    });
    group.bench_function("jobhook_invoke_log_context", |b| {
        b.iter(|| rig.runtime.block_on(rig.deliver(&rig.log_context)))
    });
    match ExtismPeer::new() {
        Ok(mut peer) => {
            for (name, call) in [
                ("extism_reused", PeerCall::Reused),
                ("extism_reused_raw", PeerCall::ReusedRaw),
                ("extism_fresh", PeerCall::Fresh),
            ] {
                group.bench_function(name, |b| b.iter(|| peer.call(call, &rig.context)));
            }
        }
        Err(e) => eprintln!("Extism peer not available: {e:#}"),
    }
    group.finish();
}

criterion_group!(benches, deliveries);
criterion_main!(benches);
