-- purpose: How much each decoder block changes the residual stream: mean cosine between the stream
--          entering a block (layer l-1; -1 = embedding output) and leaving it (layer l), over text
--          tokens, plus ShortGPT's Block Influence (1 - mean cosine) and the mean angular distance.
--          Reads the per-block text-token sums written at capture (block_sums), not the token rows.
-- inputs: raw_block_sums, samples (text_start, text_end), raw_token_layers (samples without block_sums)
-- params: $run
-- outputs: layer, tokens, mean_cos, block_influence, angular_distance
--
-- Complete samples only: both parts join the run's `samples` rows. A sample with no block_sums rows
-- (captured before the table existed, and not since optimized) is summed from its token_layers rows
-- over its text span, as the former form of this query did for every sample; when every sample
-- has its sums that part reads nothing. The clamp runs in DOUBLE (FLOAT widens exactly) and keeps
-- a NaN cosine (a zero vector) NaN, as the capture's sums do.
WITH s AS (SELECT sample_id, text_start, text_end FROM samples WHERE run = $run),
b AS (
    SELECT b.sample_id, b.layer, b.text_tokens, b.cos_sum, b.angle_sum
    FROM raw_block_sums AS b JOIN s ON s.sample_id = b.sample_id
    WHERE b.run = $run AND b.site = 'resid_post'
),
parts AS (
    SELECT layer, text_tokens AS tokens, cos_sum, angle_sum FROM b WHERE text_tokens > 0
    UNION ALL
    SELECT t.layer, count(*), sum(t.cos_prev::DOUBLE), sum(acos(CASE WHEN isnan(t.cos_prev) THEN t.cos_prev::DOUBLE ELSE least(greatest(t.cos_prev::DOUBLE, -1.0), 1.0) END) / pi())
    FROM raw_token_layers AS t JOIN (SELECT * FROM s ANTI JOIN b USING (sample_id)) AS m ON m.sample_id = t.sample_id
    WHERE t.run = $run AND t.site = 'resid_post' AND t.cos_prev IS NOT NULL
      AND t.pos >= m.text_start AND t.pos < m.text_end
    GROUP BY t.layer
)
SELECT layer,
       sum(tokens)::BIGINT AS tokens,
       sum(cos_sum) / sum(tokens) AS mean_cos,
       1 - sum(cos_sum) / sum(tokens) AS block_influence,
       sum(angle_sum) / sum(tokens) AS angular_distance
FROM parts
GROUP BY layer
ORDER BY layer;
