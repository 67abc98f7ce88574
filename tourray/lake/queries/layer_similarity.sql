-- purpose: How much each decoder block changes the residual stream: mean cosine between the stream
--          entering a block (layer l-1; -1 = embedding output) and leaving it (layer l), over text
--          tokens, plus ShortGPT's Block Influence (1 - mean cosine) and the mean angular distance.
--          Reads the per-token cosines written at capture (no join of vectors).
-- inputs: token_layers (site resid_post, cos_prev), samples (text_start, text_end)
-- params: $run
-- outputs: layer, tokens, mean_cos, block_influence, angular_distance
SELECT t.layer,
       count(*) AS tokens,
       avg(t.cos_prev) AS mean_cos,
       1 - avg(t.cos_prev) AS block_influence,
       avg(acos(least(greatest(t.cos_prev, -1), 1)) / pi()) AS angular_distance
FROM token_layers AS t
JOIN samples AS s ON s.run = t.run AND s.sample_id = t.sample_id
WHERE t.run = $run AND s.run = $run AND t.site = 'resid_post' AND t.cos_prev IS NOT NULL
  AND t.pos >= s.text_start AND t.pos < s.text_end
GROUP BY t.layer
ORDER BY t.layer;
