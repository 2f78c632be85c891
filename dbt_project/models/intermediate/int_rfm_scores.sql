-- RFM: recency, frequency and monetary scores from 1 to var('rfm_bins') (5) for every
-- contact with at least one paid order, and a named segment.
-- Scores are the cumulative distribution over buyers, so equal values get equal scores
-- (ntile would split ties arbitrarily): the most recent, most frequent and biggest
-- spenders score 5.

with

contact_orders as (

    select * from {{ ref('int_contact_orders') }}

),

distributions as (

    select
        contact_id,
        orders_count,
        revenue,
        last_order_at,
        cume_dist() over (order by last_order_at) as recency_position,
        cume_dist() over (order by orders_count) as frequency_position,
        cume_dist() over (order by revenue) as monetary_position
    from contact_orders

),

scored as (

    select
        contact_id,
        orders_count,
        cast(ceil(recency_position * {{ var('rfm_bins') }}) as integer) as r_score,
        cast(ceil(frequency_position * {{ var('rfm_bins') }}) as integer) as f_score,
        cast(ceil(monetary_position * {{ var('rfm_bins') }}) as integer) as m_score
    from distributions

),

final as (

    select
        contact_id,
        r_score,
        f_score,
        m_score,
        cast(r_score as {{ dbt.type_string() }})
            || cast(f_score as {{ dbt.type_string() }})
            || cast(m_score as {{ dbt.type_string() }}) as rfm_code,
        case
            when r_score >= 4 and f_score >= 4 then 'champions'
            when r_score >= 4 and orders_count = 1 then 'new'
            when r_score >= 3 and f_score >= 3 then 'loyal'
            when r_score <= 2 and f_score >= 3 then 'at_risk'
            when r_score <= 2 then 'hibernating'
            else 'needs_attention'
        end as rfm_segment
    from scored

)

select * from final
