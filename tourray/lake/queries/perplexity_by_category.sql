-- purpose: How surprised the model is by each category of texts: mean surprisal (nats/token) and
--          perplexity over text tokens (template and system-prompt tokens excluded).
-- inputs: tokens, samples
-- params: $run
-- outputs: category, samples, tokens, mean_surprisal, perplexity, mean_entropy
SELECT s.category,
       count(DISTINCT s.sample_id) AS samples,
       count(*) AS tokens,
       avg(t.surprisal) AS mean_surprisal,
       exp(avg(t.surprisal)) AS perplexity,
       avg(t.entropy) AS mean_entropy
FROM tokens AS t
JOIN samples AS s ON s.run = t.run AND s.sample_id = t.sample_id
WHERE t.run = $run AND t.segment = 'text' AND t.surprisal IS NOT NULL
GROUP BY s.category
ORDER BY perplexity;
