"""Stage 2, collection and storage: bundled digits and seeded splits (data), the batched
multi-run trainer (collect), the shard store (store) and the (θ, θ*) pair sampler (pairs)."""
