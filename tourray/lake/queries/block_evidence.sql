-- purpose: Per decoder block, how much it changes the residual stream on text tokens: ShortGPT's
--          block influence (1 - mean cosine of the block's input and output), the same weighted by
--          each position's next-token entropy, and the size of the block's update ||out - in|| (absolute and
--          relative to ||in||), from the per-block sums written at capture (block_sums; no vectors read).
-- inputs: raw_block_sums, samples (complete samples only); token_layers, tokens for samples without block_sums
-- params: $run
-- outputs: block, tokens, mean_cos, block_influence, entropy_weighted_influence, mean_update_norm, rel_update_norm
--
-- A sample with no block_sums rows (captured before the table existed, and not since optimized) is
-- summed from its token rows as the former form of this query did for every sample: layer l's
-- resid_post joined to layer l-1's at each text position, and the entropy of the distribution
-- computed at pos (stored with token pos + 1). When every sample has its sums that part reads nothing.
WITH s AS (SELECT sample_id FROM samples WHERE run = $run),
b AS (
    SELECT b.* FROM raw_block_sums AS b JOIN s ON s.sample_id = b.sample_id
    WHERE b.run = $run AND b.site = 'resid_post'
),
m AS (SELECT * FROM s ANTI JOIN b USING (sample_id)),
k AS (
    SELECT sample_id, pos, segment, lead(entropy) OVER (PARTITION BY sample_id ORDER BY pos) AS entropy
    FROM raw_tokens WHERE run = $run AND sample_id IN (SELECT sample_id FROM m)
),
t AS (
    SELECT tl.sample_id, tl.pos, tl.layer, tl.norm::DOUBLE AS norm, tl.cos_prev::DOUBLE AS cos_prev, k.entropy::DOUBLE AS entropy
    FROM raw_token_layers AS tl
    JOIN k ON k.sample_id = tl.sample_id AND k.pos = tl.pos
    WHERE tl.run = $run AND tl.site = 'resid_post' AND k.segment = 'text'
),
d AS (  -- block l: input = layer l-1's resid_post (the embedding for l = 0), output = layer l's
    SELECT o.layer AS block, o.cos_prev, o.entropy, i.norm AS in_norm,
           sqrt(greatest(o.norm * o.norm + i.norm * i.norm - 2 * i.norm * o.norm * o.cos_prev, 0)) AS upd
    FROM t AS o JOIN t AS i ON i.sample_id = o.sample_id AND i.pos = o.pos AND i.layer = o.layer - 1
    WHERE o.layer >= 0 AND o.cos_prev IS NOT NULL
),
parts AS (
    SELECT layer AS block, text_tokens AS tokens, cos_sum, entropy_sum, entropy_cos_sum, update_sum, rel_update_sum
    FROM b WHERE layer >= 0 AND text_tokens > 0
    UNION ALL
    SELECT block, count(*), sum(cos_prev), sum(entropy), sum(entropy * cos_prev), sum(upd), sum(upd / in_norm)
    FROM d GROUP BY block
)
SELECT block,
       sum(tokens)::BIGINT AS tokens,
       sum(cos_sum) / sum(tokens) AS mean_cos,
       1 - sum(cos_sum) / sum(tokens) AS block_influence,
       1 - sum(entropy_cos_sum) / sum(entropy_sum) AS entropy_weighted_influence,
       sum(update_sum) / sum(tokens) AS mean_update_norm,
       sum(rel_update_sum) / sum(tokens) AS rel_update_norm
FROM parts
GROUP BY block
ORDER BY block;
