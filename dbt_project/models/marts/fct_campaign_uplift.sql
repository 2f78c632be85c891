-- One row per campaign with a holdout: how many more recipients converted because they were
-- sent the message. Treatment = everyone sent a message (all variants), holdout = the
-- audience kept back. The interval of the difference is Newcombe's hybrid score interval
-- (method 10), built from the two Wilson 95% intervals:
--   low  = d - sqrt((p1 - l1)² + (u2 - p2)²)
--   high = d + sqrt((u1 - p1)² + (p2 - l2)²)

with

performance as (

    select * from {{ ref('fct_campaign_performance') }}

),

treatment as (

    select
        campaign_id,
        cast(sum(sent) as bigint) as recipients,
        cast(sum(converted_recipients) as bigint) as converted,
        sum(revenue) as revenue
    from performance
    where holdout = 0
    group by 1

),

holdout as (

    select
        campaign_id,
        cast(sum(audience) as bigint) as recipients,
        cast(sum(converted_recipients) as bigint) as converted,
        sum(revenue) as revenue
    from performance
    where holdout > 0
    group by 1

),

rates as (

    select
        holdout.campaign_id,
        coalesce(treatment.recipients, 0) as treatment_recipients,
        coalesce(treatment.converted, 0) as treatment_converted,
        coalesce(treatment.revenue, 0) as treatment_revenue,
        holdout.recipients as holdout_recipients,
        holdout.converted as holdout_converted,
        holdout.revenue as holdout_revenue,
        case when treatment.recipients > 0
            then cast(treatment.converted as double precision) / treatment.recipients
        end as p1,
        {{ wilson_low('treatment.converted', 'treatment.recipients') }} as l1,
        {{ wilson_high('treatment.converted', 'treatment.recipients') }} as u1,
        case when holdout.recipients > 0
            then cast(holdout.converted as double precision) / holdout.recipients
        end as p2,
        {{ wilson_low('holdout.converted', 'holdout.recipients') }} as l2,
        {{ wilson_high('holdout.converted', 'holdout.recipients') }} as u2
    from holdout
    left join treatment
        on holdout.campaign_id = treatment.campaign_id

),

final as (

    select
        campaign_id,
        treatment_recipients,
        treatment_converted,
        p1 as treatment_conversion_rate,
        holdout_recipients,
        holdout_converted,
        p2 as holdout_conversion_rate,
        p1 - p2 as uplift,
        p1 - p2 - sqrt((p1 - l1) * (p1 - l1) + (u2 - p2) * (u2 - p2)) as uplift_low,
        p1 - p2 + sqrt((u1 - p1) * (u1 - p1) + (p2 - l2) * (p2 - l2)) as uplift_high,
        (p1 - p2) * treatment_recipients as incremental_conversions,
        case when holdout_recipients > 0
            then treatment_revenue - holdout_revenue / holdout_recipients * treatment_recipients
        end as incremental_revenue
    from rates

)

select * from final
