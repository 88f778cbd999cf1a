//! The cost of step 5 on the hot path: checking and counting a request against a
//! proxy's and a credential's limits, and reserving + settling a spend-capped key, in
//! memory (moka) and in Redis (the real server on 127.0.0.1:6379, skipped if absent).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use latchkey::dataplane::budget::{
    Budgets, Limit, LocalBudgets, Rate, RedisBudgets, SystemClock, redis_connection,
};
use latchkey::dataplane::spend::{
    Account, Holder, LocalSpend, RedisSpend, Settlement, Spend, Unit,
};

fn limits(tag: &str) -> Vec<Limit> {
    // Limits high enough that every iteration is admitted: the common case.
    vec![
        Limit {
            key: format!("bench:{tag}:proxy:minute").into(),
            rate: Rate::per_minute(u32::MAX),
        },
        Limit {
            key: format!("bench:{tag}:credential:day").into(),
            rate: Rate::per_day(u32::MAX),
        },
    ]
}

fn accounts(tag: &str) -> Vec<Account> {
    vec![Account {
        id: format!("bench:{tag}:key").into(),
        cap_micros: Some(u64::MAX / 4),
        seed_micros: 0,
        ttl_s: Some(600),
        unit: Unit::Micros,
        holder: Holder::Key,
        period: None,
    }]
}

fn budget(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tag = std::process::id().to_string();
    let mut stores: Vec<(&str, Budgets, Spend)> = vec![(
        "moka",
        Budgets::Local(LocalBudgets::new(Arc::new(SystemClock))),
        Spend::Local(LocalSpend::default()),
    )];
    let redis = runtime.block_on(async {
        let connection = redis_connection("redis://127.0.0.1:6379").ok()?;
        let budgets = Budgets::Redis(RedisBudgets::new(connection.clone()));
        budgets.admit(&limits(&tag)).await.ok()?;
        Some((budgets, Spend::Redis(RedisSpend::new(connection))))
    });
    match redis {
        Some((budgets, spend)) => stores.push(("redis", budgets, spend)),
        None => eprintln!("no Redis at 127.0.0.1:6379: the redis benchmarks are skipped"),
    }
    let mut group = c.benchmark_group("budget");
    for (name, budgets, spend) in &stores {
        let limits = limits(&tag);
        group.bench_function(format!("rate_limits/{name}"), |b| {
            b.iter(|| runtime.block_on(budgets.admit(black_box(&limits))).unwrap())
        });
        let accounts = accounts(&tag);
        group.bench_function(format!("spend_reserve_settle/{name}"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    spend
                        .reserve(black_box(&accounts), 100)
                        .await
                        .unwrap()
                        .unwrap();
                    spend
                        .settle(&accounts, 100, Settlement::Charge(100), 0)
                        .await
                        .unwrap();
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, budget);
criterion_main!(benches);
