-- purpose: How much each decoder block changes the residual stream: mean cosine between the stream
--          entering a block (layer l-1; -1 = embedding output) and leaving it (layer l), over text
--          tokens, plus ShortGPT's Block Influence (1 - mean cosine) and the mean angular distance.
--          Reads the per-token cosines written at capture (no join of vectors).
-- inputs: raw_token_layers (site resid_post, cos_prev), samples (text_start, text_end)
-- params: $run
-- outputs: layer, tokens, mean_cos, block_influence, angular_distance
--
-- The inner join with the run's `samples` rows keeps complete samples only (what the token_layers
-- view does with a semi join of its own), so the query reads raw_token_layers and joins once, on
-- sample_id alone (both sides are already cut to the run): half the time of joining token_layers.
-- The clamp runs in DOUBLE (the same values: FLOAT widens exactly and -1, 1 are exact in both):
-- least/greatest on the FLOAT column cost 7x the rest of the aggregate in DuckDB 2.0.
SELECT t.layer,
       count(*) AS tokens,
       avg(t.cos_prev) AS mean_cos,
       1 - avg(t.cos_prev) AS block_influence,
       avg(acos(least(greatest(t.cos_prev::DOUBLE, -1.0), 1.0)) / pi()) AS angular_distance
FROM raw_token_layers AS t
JOIN (SELECT sample_id, text_start, text_end FROM samples WHERE run = $run) AS s ON s.sample_id = t.sample_id
WHERE t.run = $run AND t.site = 'resid_post' AND t.cos_prev IS NOT NULL
  AND t.pos >= s.text_start AND t.pos < s.text_end
GROUP BY t.layer
ORDER BY t.layer;
