-- purpose: A variant run (e.g. a pruned model) against its baseline run over the same texts, per
--          category plus a pooled ALL row: perplexity and its ratio, surprisal on factual tokens
--          (token_class number | proper), mean KL(reference || variant), files with perplexity > 1000.
--          Text tokens only, matched by (sample_id, pos); samples complete in both runs.
-- inputs: tokens, samples
-- params: $base, $variant
-- outputs: category, samples, tokens, base_mean_surprisal, variant_mean_surprisal, base_perplexity,
--          variant_perplexity, ppl_ratio, factual_tokens, base_factual_mean, variant_factual_mean,
--          base_factual_max, variant_factual_max, factual_max_ratio, factual_mean_ratio, mean_kl,
--          base_files_ppl_over_1000, variant_files_ppl_over_1000, base_max_file_ppl, variant_max_file_ppl
WITH
-- every text token of the baseline with the variant's token at the same position of the same sample
matched AS (
    SELECT s.category,
           b.sample_id,
           b.surprisal::DOUBLE AS base_s,
           v.surprisal::DOUBLE AS variant_s,
           b.token_class IN ('number', 'proper') AS factual,
           v.kl_ref::DOUBLE AS kl_ref
    FROM tokens AS b
    JOIN tokens AS v ON v.run = $variant AND v.sample_id = b.sample_id AND v.pos = b.pos
    JOIN samples AS s ON s.run = $base AND s.sample_id = b.sample_id
    JOIN samples AS sv ON sv.run = $variant AND sv.sample_id = b.sample_id
    WHERE b.run = $base AND b.segment = 'text' AND b.surprisal IS NOT NULL
      AND v.segment = 'text' AND v.surprisal IS NOT NULL
),
-- token statistics, per category and pooled (grouping(category) = 1 on the pooled row)
by_tokens AS (
    SELECT coalesce(category, 'ALL') AS category,
           grouping(category) AS pooled,
           count(DISTINCT sample_id) AS samples,
           count(*) AS tokens,
           avg(base_s) AS base_mean_surprisal,
           avg(variant_s) AS variant_mean_surprisal,
           count(*) FILTER (WHERE factual) AS factual_tokens,
           avg(base_s) FILTER (WHERE factual) AS base_factual_mean,
           avg(variant_s) FILTER (WHERE factual) AS variant_factual_mean,
           max(base_s) FILTER (WHERE factual) AS base_factual_max,
           max(variant_s) FILTER (WHERE factual) AS variant_factual_max,
           avg(kl_ref) AS mean_kl
    FROM matched
    GROUP BY GROUPING SETS ((category), ())
),
-- one row per file (sample): its perplexity under each model
files AS (
    SELECT category, sample_id, exp(avg(base_s)) AS base_ppl, exp(avg(variant_s)) AS variant_ppl
    FROM matched
    GROUP BY category, sample_id
),
by_files AS (
    SELECT coalesce(category, 'ALL') AS category,
           grouping(category) AS pooled,
           count(*) FILTER (WHERE base_ppl > 1000) AS base_files_ppl_over_1000,
           count(*) FILTER (WHERE variant_ppl > 1000) AS variant_files_ppl_over_1000,
           max(base_ppl) AS base_max_file_ppl,
           max(variant_ppl) AS variant_max_file_ppl
    FROM files
    GROUP BY GROUPING SETS ((category), ())
)
SELECT t.category,
       t.samples,
       t.tokens,
       t.base_mean_surprisal,
       t.variant_mean_surprisal,
       exp(t.base_mean_surprisal) AS base_perplexity,
       exp(t.variant_mean_surprisal) AS variant_perplexity,
       exp(t.variant_mean_surprisal) / exp(t.base_mean_surprisal) AS ppl_ratio,
       t.factual_tokens,
       t.base_factual_mean,
       t.variant_factual_mean,
       t.base_factual_max,
       t.variant_factual_max,
       t.variant_factual_max / nullif(t.base_factual_max, 0) AS factual_max_ratio,
       t.variant_factual_mean / nullif(t.base_factual_mean, 0) AS factual_mean_ratio,
       t.mean_kl,
       f.base_files_ppl_over_1000,
       f.variant_files_ppl_over_1000,
       f.base_max_file_ppl,
       f.variant_max_file_ppl
FROM by_tokens AS t
JOIN by_files AS f ON f.category = t.category AND f.pooled = t.pooled
ORDER BY t.pooled,  -- the pooled ALL row last
         CASE t.category WHEN 'seen_cities' THEN 0 WHEN 'unseen_similar' THEN 1
                         WHEN 'unseen_different' THEN 2 WHEN 'edge_cases' THEN 3 ELSE 4 END,
         t.category;
