-- One row per campaign x variant (the holdout is a variant of its own): the audience
-- waterfall, delivery, engagement, conversions and cost.

with

messages as (

    select * from {{ ref('fct_messages') }}

),

campaigns as (

    select * from {{ ref('stg_ops__campaigns') }}

),

variant_totals as (

    select
        campaign_id,
        variant,
        count(*) as audience,
        cast(sum(case when is_holdout then 1 else 0 end) as bigint) as holdout,
        cast(sum(case when status = 'suppressed' then 1 else 0 end) as bigint) as suppressed,
        cast(sum(case when status = 'rejected' then 1 else 0 end) as bigint) as rejected,
        cast(sum(case when status = 'planned' then 1 else 0 end) as bigint) as pending,
        cast(sum(case when sent_at is not null then 1 else 0 end) as bigint) as sent,
        cast(sum(case when status = 'delivered' then 1 else 0 end) as bigint) as delivered,
        cast(sum(case when status = 'undelivered' then 1 else 0 end) as bigint) as undelivered,
        cast(sum(case when status = 'failed' then 1 else 0 end) as bigint) as failed,
        cast(sum(case when clicked then 1 else 0 end) as bigint) as clicks,
        cast(sum(clicks) as bigint) as total_clicks,
        cast(sum(replies) as bigint) as replies,
        cast(sum(case when opted_out_after then 1 else 0 end) as bigint) as opt_outs,
        cast(sum(conversions) as bigint) as conversions,
        cast(sum(case when converted then 1 else 0 end) as bigint) as converted_recipients,
        sum(revenue) as revenue,
        cast(sum(case when sent_at is not null then segments else 0 end) as bigint) as segments,
        sum(cost) as cost
    from messages
    group by 1, 2

),

final as (

    select
        variant_totals.campaign_id,
        campaigns.campaign_name,
        campaigns.campaign_kind,
        campaigns.campaign_status,
        campaigns.launched_at,
        variant_totals.variant,
        variant_totals.audience,
        variant_totals.holdout,
        variant_totals.suppressed,
        variant_totals.rejected,
        variant_totals.pending,
        variant_totals.sent,
        variant_totals.delivered,
        variant_totals.undelivered,
        variant_totals.failed,
        variant_totals.clicks,
        variant_totals.total_clicks,
        variant_totals.replies,
        variant_totals.opt_outs,
        variant_totals.conversions,
        variant_totals.converted_recipients,
        variant_totals.revenue,
        variant_totals.segments,
        variant_totals.cost,
        case when variant_totals.sent > 0
            then cast(variant_totals.delivered as double precision) / variant_totals.sent
        end as delivery_rate,
        case when variant_totals.delivered > 0
            then cast(variant_totals.clicks as double precision) / variant_totals.delivered
        end as click_through_rate,
        case
            when variant_totals.variant = 'holdout' and variant_totals.audience > 0
                then cast(variant_totals.converted_recipients as double precision) / variant_totals.audience
            when variant_totals.delivered > 0
                then cast(variant_totals.converted_recipients as double precision) / variant_totals.delivered
        end as conversion_rate
    from variant_totals
    inner join campaigns
        on variant_totals.campaign_id = campaigns.campaign_id

)

select * from final
