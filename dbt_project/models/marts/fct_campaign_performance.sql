-- One row per campaign x variant (the holdout is a variant of its own): the audience
-- waterfall, delivery, engagement, complaints, conversions and cost, with Wilson 95%
-- intervals for every rate. The delivery rate is over settled messages (delivered,
-- undelivered or failed by their final receipt): a message still awaiting its receipt is
-- neither delivered nor not, so it counts in `awaiting_receipt` and in no rate. The other
-- rates are over delivered messages, except the holdout's conversion rate, which is over its
-- audience (nobody in it was sent anything). Clicks are people's (int_clicks_classified.is_prefetch);
-- link previews and scanners are counted apart in `prefetch_clicks`.

with

messages as (

    select * from {{ ref('fct_messages') }}

),

campaigns as (

    select * from {{ ref('stg_ops__campaigns') }}
    -- test sends to the team's seed numbers are not campaigns anyone judges
    where test_of_campaign_id is null

),

replies as (

    select * from {{ ref('fct_replies') }}

),

complaints as (

    select
        campaign_id,
        variant,
        count(distinct message_id) as complaints
    from replies
    where is_complaint
        and message_id is not null
    group by 1, 2

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
        cast(sum(case when is_settled then 1 else 0 end) as bigint) as settled,
        cast(sum(case when is_awaiting_receipt then 1 else 0 end) as bigint) as awaiting_receipt,
        cast(sum(case when clicked then 1 else 0 end) as bigint) as clicks,
        cast(sum(clicks) as bigint) as total_clicks,
        cast(sum(prefetch_clicks) as bigint) as prefetch_clicks,
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

rates as (

    select
        variant_totals.*,
        cast(coalesce(complaints.complaints, 0) as bigint) as complaints,
        -- the holdout was sent nothing: its conversions are counted over the whole audience
        case when variant_totals.holdout > 0 then variant_totals.audience else variant_totals.delivered end
            as conversion_trials
    from variant_totals
    left join complaints
        on variant_totals.campaign_id = complaints.campaign_id
        and variant_totals.variant = complaints.variant

),

final as (

    select
        rates.campaign_id,
        campaigns.campaign_name,
        campaigns.campaign_kind,
        campaigns.campaign_status,
        campaigns.launched_at,
        rates.variant,
        rates.audience,
        rates.holdout,
        rates.suppressed,
        rates.rejected,
        rates.pending,
        rates.sent,
        rates.delivered,
        rates.undelivered,
        rates.failed,
        rates.settled,
        rates.awaiting_receipt,
        rates.clicks,
        rates.total_clicks,
        rates.prefetch_clicks,
        rates.replies,
        rates.opt_outs,
        rates.conversions,
        rates.converted_recipients,
        rates.revenue,
        rates.segments,
        rates.cost,
        case when rates.settled > 0
            then cast(rates.delivered as double precision) / rates.settled
        end as delivery_rate,
        case when rates.delivered > 0
            then cast(rates.clicks as double precision) / rates.delivered
        end as click_through_rate,
        case when rates.conversion_trials > 0
            then cast(rates.converted_recipients as double precision) / rates.conversion_trials
        end as conversion_rate,
        {{ wilson_low('rates.delivered', 'rates.settled') }} as delivery_rate_low,
        {{ wilson_high('rates.delivered', 'rates.settled') }} as delivery_rate_high,
        {{ wilson_low('rates.clicks', 'rates.delivered') }} as click_through_rate_low,
        {{ wilson_high('rates.clicks', 'rates.delivered') }} as click_through_rate_high,
        {{ wilson_low('rates.converted_recipients', 'rates.conversion_trials') }} as conversion_rate_low,
        {{ wilson_high('rates.converted_recipients', 'rates.conversion_trials') }} as conversion_rate_high,
        case when rates.delivered > 0
            then cast(rates.opt_outs as double precision) / rates.delivered
        end as opt_out_rate,
        {{ wilson_low('rates.opt_outs', 'rates.delivered') }} as opt_out_rate_low,
        {{ wilson_high('rates.opt_outs', 'rates.delivered') }} as opt_out_rate_high,
        rates.complaints,
        case when rates.delivered > 0
            then cast(rates.complaints as double precision) / rates.delivered
        end as complaint_rate,
        {{ wilson_low('rates.complaints', 'rates.delivered') }} as complaint_rate_low,
        {{ wilson_high('rates.complaints', 'rates.delivered') }} as complaint_rate_high,
        case when rates.conversions > 0
            then rates.cost / rates.conversions
        end as cost_per_conversion,
        case when rates.cost > 0
            then (rates.revenue - rates.cost) / rates.cost
        end as roi
    from rates
    inner join campaigns
        on rates.campaign_id = campaigns.campaign_id

)

select * from final
