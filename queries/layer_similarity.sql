-- purpose: How much each decoder block changes the residual stream: mean cosine between the stream
--          entering a block (layer l-1; -1 = embedding output) and leaving it (layer l), over text
--          tokens, plus ShortGPT's Block Influence (1 - mean cosine) and the mean angular distance.
-- inputs: activations (site resid_post), tokens (segment)
-- params: $run
-- outputs: layer, tokens, mean_cos, block_influence, angular_distance
WITH text_tokens AS (
    SELECT sample_id, pos FROM tokens WHERE run = $run AND segment = 'text'
), a AS (
    SELECT sample_id, pos, layer, h FROM activations WHERE run = $run AND site = 'resid_post'
), pairs AS (
    SELECT o.layer AS layer, array_cosine_similarity(i.h, o.h) AS cos
    FROM a AS o
    JOIN a AS i ON i.sample_id = o.sample_id AND i.pos = o.pos AND i.layer = o.layer - 1
    SEMI JOIN text_tokens t ON t.sample_id = o.sample_id AND t.pos = o.pos
)
SELECT layer,
       count(*) AS tokens,
       avg(cos) AS mean_cos,
       1 - avg(cos) AS block_influence,
       avg(acos(least(greatest(cos, -1), 1)) / pi()) AS angular_distance
FROM pairs
GROUP BY layer
ORDER BY layer;
