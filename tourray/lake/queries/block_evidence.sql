-- purpose: Per decoder block, how much it changes the residual stream on text tokens: ShortGPT's
--          block influence (1 - mean cosine of the block's input and output), the same weighted by
--          each position's next-token entropy, and the size of the block's update ||out - in|| (absolute and
--          relative to ||in||), from token_layers' per-token norms and cosines (no vectors read).
-- inputs: token_layers, tokens, samples (complete samples only)
-- params: $run
-- outputs: block, tokens, mean_cos, block_influence, entropy_weighted_influence, mean_update_norm, rel_update_norm
WITH k AS (  -- next-token entropy: that of the distribution computed at pos (stored with token pos + 1)
    SELECT sample_id, pos, segment, lead(entropy) OVER (PARTITION BY sample_id ORDER BY pos) AS entropy
    FROM tokens WHERE run = $run
),
t AS (
    SELECT tl.sample_id, tl.pos, tl.layer, tl.norm, tl.cos_prev, k.entropy
    FROM token_layers AS tl
    JOIN k ON k.sample_id = tl.sample_id AND k.pos = tl.pos
    JOIN samples AS s ON s.run = tl.run AND s.sample_id = tl.sample_id
    WHERE tl.run = $run AND tl.site = 'resid_post' AND k.segment = 'text'
),
d AS (  -- block l: input = layer l-1's resid_post (the embedding for l = 0), output = layer l's
    SELECT b.layer AS block, b.cos_prev, b.entropy,
           sqrt(greatest(b.norm * b.norm + a.norm * a.norm - 2 * a.norm * b.norm * b.cos_prev, 0)) AS upd,
           a.norm AS in_norm
    FROM t AS b JOIN t AS a ON a.sample_id = b.sample_id AND a.pos = b.pos AND a.layer = b.layer - 1
    WHERE b.layer >= 0 AND b.cos_prev IS NOT NULL
)
SELECT block,
       count(*) AS tokens,
       avg(cos_prev) AS mean_cos,
       1 - avg(cos_prev) AS block_influence,
       1 - sum(entropy * cos_prev) / sum(entropy) AS entropy_weighted_influence,
       avg(upd) AS mean_update_norm,
       avg(upd / in_norm) AS rel_update_norm
FROM d
GROUP BY block
ORDER BY block;
